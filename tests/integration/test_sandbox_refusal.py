"""A recipe with tools on a machine where no jail can be made (NSJAIL names nothing): `spo train` refuses, exit
code 2, saying how to go on, and leaves no run directory; with `allow_unisolated` it runs, warning on stderr and in
its log."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import tiny_recipe_dict, write_recipe


def tool_recipe(tmp_path, **sandbox):
    data = tiny_recipe_dict(tmp_path)
    data["warm_start"] = {"kind": "none"}
    data["train"].update(iterations=1, save_steps=1)
    data["sampling"].update(prompts_per_iteration=2, num_generations=2, max_completion_length=16)
    data["sampling"]["tools"] = {"max_tool_calls": 1, "sandbox": {"kind": "local", "workers": 1, **sandbox}}
    data["eval"].update(before_training=False, after_training=False)
    return write_recipe(tmp_path / "recipe.yaml", data), tmp_path / "run"


def train(recipe, **env):
    return subprocess.run([sys.executable, "-m", "spo_cli", "train", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)  # fmt: skip


def test_no_jail_means_no_run(tmp_path):
    recipe, run_dir = tool_recipe(tmp_path)
    out = train(recipe, NSJAIL="")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sampling.tools.sandbox" in out.stderr and "allow_unisolated: true" in out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir()), "the failed start left nothing to block a retry"


def test_allowed_unisolated_runs_with_a_warning(tmp_path):
    python = "/usr/bin/python3" if os.geteuid() == 0 else sys.executable  # as root: a Python every uid can read
    recipe, _ = tool_recipe(tmp_path, allow_unisolated=True, python=python)
    out = train(recipe, NSJAIL="")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING: model-written code runs unsandboxed" in out.stderr
    assert "NO ISOLATION" in out.stdout, "the run's log says it too"
