"""The README's main job and its SPO-chain, SPO-tree, PPO, segment-GAE and single-stream twins, end to end (minutes each on 2 cores):
RL must raise held-out accuracy within the 15 minutes a tiny recipe is allowed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ..conftest import REPO


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        "tiny_arith_grpo.yaml",
        "tiny_arith_chain.yaml",
        "tiny_arith_tree.yaml",
        "tiny_arith_ppo.yaml",
        "tiny_arith_segment_gae.yaml",
        "tiny_arith_single_stream.yaml",
    ],
)
def test_main_job_improves_held_out_accuracy(tmp_path, recipe):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "spo_cli", "train", f"recipes/{recipe}", f"run.output_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    seconds = time.perf_counter() - start
    print(f"{recipe}: {seconds:.0f}s  before {before}  after {after}")
    assert seconds < 15 * 60, f"{recipe} took {seconds:.0f} s on this machine"
    assert "held-out sampled accuracy: before RL" in out.stdout
    assert before["greedy_accuracy"] > 0.5, "the warm start must pass the learning transition"
    assert after["sampled_accuracy"] > before["sampled_accuracy"]
