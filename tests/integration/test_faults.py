"""Faults during training: SIGKILL at chosen points of an iteration, a disk that fills up while a checkpoint is
written, and checkpoint files that would run code if unpickled. The run must always be resumable to the result of
an uninterrupted one, and no published checkpoint may ever be unreadable."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spo_cli.checkpoint import latest_checkpoint, list_checkpoints, read_trainer_state
from spo_cli.errors import SpoError, SpoUserError
from spo_cli.faults import CRASH_ENV, POINTS
from spo_cli.recipe import parse_recipe

from ..conftest import REPO, tiny_recipe_dict, write_recipe
from .test_distributed import FROM_WARM_START
from .test_train import assert_same_metrics, read_metrics

# One-operation problems and a longer warm start, so every iteration updates the policy and the optimizer state and
# RNG matter for the comparison.
SECTIONS = dict(
    train={"iterations": 5, "save_steps": 1, "save_total_limit": 2},
    task={"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1], "eval_per_step": 8},
    warm_start={"steps": 300, "batch_size": 16, "log_every": 100},
    sampling={"prompts_per_iteration": 8},
)


def spo(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


def assert_checkpoints_readable(run: Path) -> None:
    """Every published checkpoint loads: model and tokenizer, trainer state, optimizer state (as plain tensors)."""
    from spo_cli.models import load_checkpoint

    for ckpt in list_checkpoints(run):
        load_checkpoint(ckpt / "model")
        assert read_trainer_state(ckpt)["iteration"] == int(ckpt.name.removeprefix("iter_"))
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert {"optimizer", "scheduler", "rng"} <= set(state), ckpt


def test_kills_at_every_point_of_an_iteration_resume_to_the_uninterrupted_result(tmp_path):
    # Both from test_distributed's committed warm start (these model, task and warm_start settings), copied rather
    # than made (the same bits for both: what is compared is the RL).
    warm = FROM_WARM_START
    ref = write_recipe(tmp_path / "ref.yaml", tiny_recipe_dict(tmp_path / "ref", **SECTIONS))
    done = spo("train", str(ref), warm)
    assert done.returncode == 0, done.stderr[-3000:]

    recipe = write_recipe(tmp_path / "killed.yaml", tiny_recipe_dict(tmp_path / "killed", **SECTIONS))
    run = tmp_path / "killed" / "run"
    # One run killed four times, each resume dying somewhere else; (crash point, checkpoint the next resume starts from).
    plan = [("sample:2", 1), ("optimize:3", 2), ("checkpoint:4", 3), ("publish:5", 4)]
    assert {p.split(":")[0] for p, _ in plan} == set(POINTS)
    for attempt, (crash_at, survivor) in enumerate(plan):
        out = spo("train", str(recipe), warm, *(["--resume"] if attempt else []), crash_at=crash_at)
        assert out.returncode == -9, (crash_at, out.stderr[-2000:])  # killed by its own SIGKILL
        assert not (run / "summary.json").exists()
        assert (run / ".spo-lock").is_file()  # left behind, but the kernel released the lock with the process
        assert latest_checkpoint(run).name == f"iter_{survivor:06d}", crash_at
        assert_checkpoints_readable(run)
    # The publish crash left iteration 5 complete on disk but not yet named `latest`: the resume redoes it.
    assert (run / "checkpoints" / "iter_000005" / "trainer_state.json").is_file()

    resumed = spo("train", str(recipe), warm, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = read_metrics(tmp_path / "ref" / "run"), read_metrics(run)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5]
    assert sum(r["optimizer_steps"] for r in a[1:]) > 0, "the resumed iterations must train"
    assert_same_metrics(a, b)
    sa = json.loads((tmp_path / "ref" / "run" / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sa["eval_before"] == sb["eval_before"] and sa["eval_after"] == sb["eval_after"]
    assert not list((run / "checkpoints").glob(".*partial*"))
    assert_checkpoints_readable(run)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    import spo_cli.checkpoint as checkpoint
    from spo_cli.train import train

    real_save = checkpoint.save_model

    def fills_the_disk(model, tokenizer, path):
        if "iter_000002" in str(path):
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_bytes(b"\0" * 1000)  # half a file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(model, tokenizer, path)

    monkeypatch.setattr(checkpoint, "save_model", fills_the_disk)
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    quiet = Console(file=open(os.devnull, "w"))
    with pytest.raises(SpoError) as failure:
        train(recipe, console=quiet)
    message = str(failure.value)
    assert "could not write checkpoint iter_000002" in message and "No space left on device" in message
    assert "iter_000001, is intact" in message and "--resume" in message
    assert failure.value.exit_code == 1
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "iter_000001"
    assert [c.name for c in (run / "checkpoints").iterdir() if c.name != "latest"] == ["iter_000001"]  # no half-written dir
    assert_checkpoints_readable(run)

    monkeypatch.setattr(checkpoint, "save_model", real_save)  # space freed
    summary = train(recipe, resume=True, console=quiet)
    assert summary["final_checkpoint"].endswith("iter_000003")


class _RunsCode:
    """Unpickling this creates a file: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_are_never_unpickled(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    first = spo("train", str(recipe))
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000003"
    marker = tmp_path / "pwned"

    # optimizer.pt holding an object whose unpickling runs code: refused by name, exit 2, nothing ran.
    torch.save({"optimizer": _RunsCode(marker)}, ckpt / "optimizer.pt")
    resumed = spo("train", str(recipe), "train.iterations=4", "--resume")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "optimizer.pt: holds objects other than tensors" in resumed.stderr and "Traceback" not in resumed.stderr
    assert not marker.exists()

    # Model weights: only safetensors are read, so a planted pickle in place of them is never loaded.
    model = ckpt / "model"
    (model / "model.safetensors").unlink()
    with (model / "pytorch_model.bin").open("wb") as fh:
        pickle.dump(_RunsCode(marker), fh)
    evaluated = spo("eval", str(recipe), "--checkpoint", str(ckpt), "--max-problems", "1", "--out", str(tmp_path / "e"))
    assert evaluated.returncode == 2
    assert "holds only pickled PyTorch weights" in evaluated.stderr and not marker.exists()


def test_remote_code_does_not_run_unless_the_recipe_says_so(tmp_path):
    from spo_cli.models import build_byte_tokenizer, load_pretrained
    from spo_cli.recipe import PretrainedModel

    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    build_byte_tokenizer().save_pretrained(model)
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))  # fmt: skip
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    assert PretrainedModel(name_or_path=str(model)).trust_remote_code is False
    with pytest.raises(SpoUserError, match="trust_remote_code"):
        load_pretrained(PretrainedModel(name_or_path=str(model)))
    assert not marker.exists()
