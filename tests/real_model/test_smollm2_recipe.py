"""The shipped real-model recipe, recipes/smollm2_arith_chain.yaml, with smaller budgets: a supervised warm start
of the whole SmolLM2-135M model, then SPO-chain RL of LoRA adapters, evaluated before and after.

What the tiny model never exercised: a pretrained model that scores 0 on the task until the warm start teaches
the answer format (measured: recipes/README.md, "SmolLM2 on arithmetic"), adapters trained on that warm start, and
the merged weights of model/ evaluated by `spo eval` against the adapters evaluated inside the loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REAL_MODEL, REAL_MODEL_MISSING, REPO

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not (REAL_MODEL / "config.json").is_file(), reason=REAL_MODEL_MISSING),
]

RECIPE = REPO / "recipes" / "smollm2_arith_chain.yaml"
# Half the warm start (its loss is ~0.1 by step 20), 2 iterations, a checkpoint after each, 30 held-out problems.
SMALLER = ["warm_start.steps=20", "train.iterations=2", "train.save_steps=1", "task.eval_per_step=10",
           "logging.progress=false", "logging.report_to=[]"]  # fmt: skip


def spo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    done = spo("train", str(RECIPE), f"run.output_dir={run_dir}", f"model.name_or_path={REAL_MODEL}", *SMALLER)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "LoRA: training 4,884,480 of 139,399,488 parameters" in done.stdout
    return run_dir


def test_the_warm_start_teaches_the_format_and_rl_trains_the_adapters(run):
    before = json.loads((run / "eval_before.json").read_text())
    # The base model scores 0 here (it does not answer with "#### <number>"); 20 steps of SFT get it started.
    assert before["eval/num_problems"] == 30 and before["eval/greedy_accuracy"] > 0.2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert sum(r["optimizer_steps"] for r in records) > 0, "some episode had an advantage"
    for r in records:
        assert r["segments/mean_count"] > 1 and r["mc/generated_tokens"] > 0


def test_the_adapter_is_saved_on_its_warm_start_and_merged_into_model(run):
    import torch

    from spo_cli.models import load_checkpoint

    ckpt = run / "checkpoints" / "iter_000002"
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert config["base_model_name_or_path"] == str((run / "warm_start").resolve())
    merged, _ = load_checkpoint(ckpt / "model")
    warm, _ = load_checkpoint(run / "warm_start")
    changed = {n for (n, a), b in zip(merged.named_parameters(), warm.parameters()) if not torch.equal(a, b)}
    assert changed and all(n.endswith("proj.weight") for n in changed), sorted(changed)


def test_spo_eval_of_the_merged_weights_matches_the_loops_eval_of_the_adapters(run, tmp_path):
    after = json.loads((run / "eval_after.json").read_text())
    result = spo("eval", str(RECIPE), f"model.name_or_path={REAL_MODEL}", *SMALLER, "--checkpoint",
                 str(run / "checkpoints" / "iter_000002"), "--greedy", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert row["num_problems"] == after["eval/num_problems"] == 30
    # Greedy decoding of W + BA merged against W and BA applied apart: equal up to float rounding, which can flip
    # a near-tie token; at most one problem of 30 may differ.
    assert abs(row["accuracy"] - after["eval/greedy_accuracy"]) <= 1 / 30 + 1e-9
