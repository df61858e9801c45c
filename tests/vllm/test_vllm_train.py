"""`spo train` with `sampling.backend: vllm` on the tiny recipe: the loop runs, pi_old is exact, the policy moves."""

from __future__ import annotations

import json
import math
import os

from safetensors.torch import load_file

from spo_cli.recipe import parse_recipe

from ..conftest import tiny_recipe_dict
from ._common import needs_vllm


@needs_vllm
def test_train_two_iterations_with_the_vllm_backend(tmp_path):
    from rich.console import Console

    from spo_cli.train import train

    # A warm start long enough for some reward variance; one optimizer step per iteration (64 episodes = 4 x 16), so
    # every micro-batch is scored by the policy that sampled it.
    data = tiny_recipe_dict(
        tmp_path,
        warm_start={"steps": 150},
        sampling={"backend": "vllm", "prompts_per_iteration": 8, "num_generations": 8, "max_completion_length": 32},
        train={"iterations": 2, "ppo_epochs": 1, "gradient_accumulation_steps": 16},
    )
    summary = train(parse_recipe(data), console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward", "accuracy", "completions/mean_length", "tokens_per_second"):
            assert math.isfinite(r[key]), key
    trained = [r for r in rows if r["optimizer_steps"] > 0]
    assert trained, "no iteration had reward variance: nothing to check (change the warm start or the seed)"
    for r in trained:
        # pi_old recorded by the sampler is exactly what the loss recomputes from the same weights.
        assert abs(r["ratio_mean"] - 1) < 1e-5 and r["clip_ratio"] == 0
        assert math.isfinite(r["grad_norm"]) and math.isfinite(r["entropy"])
    episode = json.loads((run / "episodes" / "iter_000002.jsonl").read_text().splitlines()[0])
    assert len(episode["response_logprobs"]) == len(episode["response_token_ids"]) > 0
    start = load_file(run / "warm_start" / "model.safetensors")
    end = load_file(run / "checkpoints" / "iter_000002" / "model" / "model.safetensors")
    assert any(not (start[k] == end[k]).all() for k in start), "the policy moved"
    assert summary["eval_after"]["num_problems"] == 8 and "sampled_accuracy" in summary["eval_after"]


@needs_vllm
def test_two_processes_with_vllm_train_like_one(tmp_path):
    """Each process drives its own engine on its share of the requests; per-request seeds make the split invisible."""
    import subprocess
    import sys

    import pytest

    from ..conftest import REPO, free_port, write_recipe

    sections = dict(
        warm_start={"steps": 150},
        sampling={"backend": "vllm", "prompts_per_iteration": 8, "num_generations": 8, "max_completion_length": 32},
        train={"iterations": 2, "ppo_epochs": 1, "gradient_accumulation_steps": 8},
    )
    one = write_recipe(tmp_path / "one.yaml", tiny_recipe_dict(tmp_path / "one", **sections))
    sections["train"] = {**sections["train"], "per_device_train_batch_size": 2}
    sections["hardware"] = {"num_processes": 2, "main_process_port": free_port()}
    two = write_recipe(tmp_path / "two.yaml", tiny_recipe_dict(tmp_path / "two", **sections))
    for path in (one, two):
        done = subprocess.run([sys.executable, "-m", "spo_cli", "train", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
    a, b = ([json.loads(line) for line in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two"))  # fmt: skip
    assert [r["iteration"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("reward", "completions/mean_length", "policy_loss", "grad_norm", "entropy"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["iteration"], key)
