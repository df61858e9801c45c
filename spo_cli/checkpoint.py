"""Checkpoints: Hugging Face model + tokenizer, optimizer, scheduler, RNG and loop position, written atomically.

Layout of a run directory:
    checkpoints/iter_000010/{model/, optimizer.pt, trainer_state.json, critic/ (estimator gae), adapter/ (LoRA),
                             deepspeed/ (DeepSpeed: every process's optimizer shard)}
    checkpoints/latest            -> text: "iter_000010"
A checkpoint directory is built under a temporary name and renamed into place when complete, and
`latest` is replaced atomically after that, so a kill at any moment leaves the last good checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spo_cli.errors import SpoError, SpoUserError
from spo_cli.faults import crash_point
from spo_cli.fsutil import atomic_write_json, atomic_write_text, publish_dir
from spo_cli.models import save_model

_NAME = re.compile(r"^iter_(\d{6})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    learner,
    tokenizer,
    trainer_state: dict[str, Any],
    keep: int | None,
    extra_writers: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Write checkpoint `iteration` atomically; every process of a distributed run calls this together.

    The main process stages the directory and writes the model (Hugging Face format, full weights), the learner's
    optimizer/scheduler/RNG state and `trainer_state.json`; under DeepSpeed every process adds its optimizer shard.
    Each of `extra_writers` is called (on the main process) with the unpublished checkpoint directory to add more
    state (a critic, a replay buffer), so that state is published atomically with the rest.
    """
    from spo_cli.lora import ADAPTER_DIR, is_peft_model, save_adapter  # torch: not before a run needs it

    cluster = learner.cluster
    root = checkpoint_root(run_dir)
    name = f"iter_{iteration:06d}"
    staging = root / f".{name}.partial"
    if cluster.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    cluster.barrier()
    learner.save_state(staging)
    if cluster.is_main:
        try:
            save_model(learner.inference_model, tokenizer, staging / "model")
            if is_peft_model(learner.inference_model):
                save_adapter(learner.inference_model, staging / ADAPTER_DIR)
            crash_point("checkpoint", iteration)
            for write in extra_writers:
                write(staging)
            (staging / "trainer_state.json").write_text(
                json.dumps({**trainer_state, "iteration": iteration, "world_size": cluster.world_size}, indent=2)
            )
        except OSError as exc:  # e.g. a full disk: the half-written directory is never published
            shutil.rmtree(staging, ignore_errors=True)
            previous = latest_checkpoint(run_dir)
            kept = f"the last good checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
            if isinstance(exc, PermissionError):  # a directory made read-only under a running run: the user's to fix
                error, fix = SpoUserError, "make it writable"
            else:
                error, fix = SpoError, "free the space"
            raise error(
                f"could not write checkpoint {name} in {root}: {exc.strerror or exc}; {kept}: {fix} and "
                "continue with `spo train RECIPE --resume`"
            ) from exc
    # Every process's shard must be on disk before the directory is published.
    cluster.barrier()
    final = root / name
    if cluster.is_main:
        publish_dir(staging, final)
        crash_point("publish", iteration)
        atomic_write_text(root / "latest", name + "\n")
        if keep is not None:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    cluster.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpoUserError(
            f"{path}: not valid JSON ({exc}); remove {checkpoint} to resume from the checkpoint before it"
        ) from None
    if not isinstance(state, dict):
        raise SpoUserError(f"{path}: not a trainer state (a JSON {type(state).__name__}, not an object)")
    return state


def save_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)
