"""Per-iteration metrics: metrics.jsonl (one JSON object per line) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from spo_cli.fsutil import atomic_write_text


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (the process was killed mid-write) is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def truncate_records(path: Path, last_iteration: int) -> None:
    """Keep only records of iterations <= last_iteration (those after it are about to be redone)."""
    kept = [r for r in read_records(path) if r.get("iteration", 0) <= last_iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Appends one line per record; on resume, drops records past the checkpoint's iteration."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_iteration: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_iteration is not None:
            truncate_records(self.path, resume_iteration)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_iteration + 1 if resume_iteration is not None else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record.get("iteration", 0))
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def iteration_seconds(run_dir: Path, through: int) -> float:
    """Time the logged iterations up to `through` used (what `train.time_budget_s` counts)."""
    records = read_records(run_dir / "metrics.jsonl")
    return sum(r.get("time/iteration_s", 0.0) for r in records if r.get("iteration", 0) <= through)
