"""Checkpoints: Hugging Face model + tokenizer, optimizer, scheduler, RNG and loop position, written atomically.

Layout of a run directory:
    checkpoints/iter_000010/{model/, optimizer.pt, trainer_state.json, critic/ (estimator gae)}
    checkpoints/latest            -> text: "iter_000010"
A checkpoint directory is built under a temporary name and renamed into place when complete, and
`latest` is replaced atomically after that, so a kill at any moment leaves the last good checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from spo_cli.fsutil import atomic_write_json, atomic_write_text, publish_dir
from spo_cli.models import save_model

_NAME = re.compile(r"^iter_(\d{6})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int | None,
    extra_writers: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Write checkpoint `iteration` atomically.

    Each of `extra_writers` is called with the unpublished checkpoint directory to add more state (a
    critic, a replay buffer), so that state is published atomically with the rest.
    """
    root = checkpoint_root(run_dir)
    name = f"iter_{iteration:06d}"
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, tokenizer, staging / "model")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        staging / "optimizer.pt",
    )
    for write in extra_writers:
        write(staging)
    (staging / "trainer_state.json").write_text(json.dumps({**trainer_state, "iteration": iteration}, indent=2))
    final = root / name
    publish_dir(staging, final)
    atomic_write_text(root / "latest", name + "\n")
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
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
    return json.loads((checkpoint / "trainer_state.json").read_text())


def load_optimizer_state(checkpoint: Path, optimizer, scheduler) -> None:
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def save_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)
