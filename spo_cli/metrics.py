"""Per-iteration metrics: metrics.jsonl (one JSON object per line), TensorBoard scalars and Weights & Biases."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

from spo_cli.errors import SpoUserError
from spo_cli.fsutil import atomic_write_text


# A damaged line of one of spo's own logs: what to do about it.
REPAIR = "the file is spo's own log and this line is damaged: delete the line (or restore the file) and run again"


def read_records(path: Path, repair: str = REPAIR) -> list[dict[str, Any]]:
    """Records of a JSONL log spo wrote; a torn last line (the process was killed mid-write, before its newline) is
    dropped. Any other line that is not a record raises SpoUserError naming file and line, and `repair`."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")  # the last item: b"" after a final newline, else a torn line
    records = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(_record(raw))
        except ValueError as exc:
            if lineno == len(lines):
                continue  # torn: a record and its newline are written at once, so this one never was
            raise SpoUserError(f"{path}:{lineno}: {exc}: {repair}") from None
    return records


def _record(raw: bytes) -> dict[str, Any]:
    """One log line as a record; ValueError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}) at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("not a record (JSON nested too deep)") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a record (a JSON {_json_type(record)}, not an object)")
    iteration = record.get("iteration", 0)
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise ValueError(f"iteration is {_clip(repr(iteration))}, not an iteration number")
    return record


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def truncate_records(path: Path, last_iteration: int) -> None:
    """Keep only records of iterations <= last_iteration (those after it are about to be redone)."""
    kept = [r for r in read_records(path) if r.get("iteration", 0) <= last_iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Appends one line per record to metrics.jsonl, and passes the numbers on to the recipe's `report_to` sinks;
    on resume, drops records past the checkpoint's iteration (they are about to be redone)."""

    def __init__(self, run_dir: Path, sinks: list[Any], resume_iteration: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_iteration is not None:
            truncate_records(self.path, resume_iteration)
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        step = int(record.get("iteration", 0))
        scalars = {
            k: v for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }  # fmt: skip
        for sink in self.sinks:
            sink.log(scalars, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoardSink:
    """Scalars in <run_dir>/tensorboard; a resumed run purges the events past the checkpoint's iteration."""

    def __init__(self, run_dir: Path, resume_iteration: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_iteration + 1 if resume_iteration is not None else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_ID_FILE = "wandb_run_id"


class WandbSink:
    """A Weights & Biases run named after the recipe's run, with the resolved recipe as its config. Its id is kept in
    <run_dir>/wandb_run_id, so a resumed spo run continues the same W&B run; W&B's files go to <run_dir>/wandb.

    W&B keeps a run's steps increasing: an iteration redone after a crash (logged before the kill, not yet
    checkpointed) is not logged again there; metrics.jsonl and TensorBoard hold the redone values."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], settings, resume: bool):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B accepts any [a-z0-9] id; its own generator is not public API
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group, tags=list(settings.tags) or None,
            name=name, config=config, id=run_id, resume="allow", dir=str(run_dir),
        )  # fmt: skip
        self.next_step = self.run.step if resume else 0  # W&B refuses (with a warning) steps below its own

    def log(self, scalars: dict[str, float], step: int) -> None:
        if step >= self.next_step:
            self.run.log(scalars, step=step)
            self.next_step = step + 1

    def close(self) -> None:
        self.run.finish()


def metric_sinks(run_dir: Path, recipe, resume_iteration: int | None) -> list[Any]:
    """The recipe's `logging.report_to` sinks, in its order."""
    sinks: list[Any] = []
    for target in recipe.logging.report_to:
        if target == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, resume_iteration))
        elif target == "wandb":
            config = recipe.model_dump(mode="json")
            resume = resume_iteration is not None
            sinks.append(WandbSink(run_dir, recipe.run.name, config, recipe.logging.wandb, resume))
    return sinks


def check_report_to_installed(recipe) -> None:
    """Refuse a run that reports to W&B without wandb installed, before anything runs."""
    if "wandb" in recipe.logging.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            from spo_cli.errors import SpoUserError

            raise SpoUserError(
                "logging.report_to: wandb needs the wandb package: pip install 'spo[wandb]' (or drop wandb from the list)"
            )


def iteration_seconds(run_dir: Path, through: int) -> float:
    """Time the logged iterations up to `through` used (what `train.time_budget_s` counts)."""
    records = read_records(run_dir / "metrics.jsonl")
    return sum(r.get("time/iteration_s", 0.0) for r in records if r.get("iteration", 0) <= through)
