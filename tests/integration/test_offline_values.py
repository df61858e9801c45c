"""`spo estimate-values --offline` on a tiny warm-started model: a whole run, a killed and resumed run, refusals."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_cli.estimate.single_stream.offline_values import read_offline_values
from spo_cli.recipe import load_recipe
from spo_cli.tasks import build_task

from ..conftest import REPO, tiny_recipe_dict, write_recipe

POOL = 48
SAMPLES = 4
# One-step problems with small operands: 150 SFT steps give a policy that solves some of them, so the values
# are a mix of 0 and 1 and comparing two files says something about the samples.
OFFLINE = {
    "task": {"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1],
             "max_start": 9, "max_add": 9, "max_mul": 3, "train_pool_size": POOL},
    "warm_start": {"steps": 150, "learning_rate": 3e-3, "log_every": 50},
    "sampling": {"num_generations": 1},
    "estimator": {"kind": "single_stream", "offline_samples": SAMPLES},
    "eval": {"temperature": 0.6, "max_completion_length": 16},
}  # fmt: skip


def spo(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spo_cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def offline(recipe: Path, policy: Path, out: Path, per_shard: int, *extra: str) -> subprocess.CompletedProcess:
    return spo("estimate-values", recipe, "--offline", "--policy", policy, "--out", out, "--prompts-per-shard", str(per_shard), *extra)


def shard_files(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".shards").glob("shard_*.json"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe file, its warm-started policy directory)."""
    tmp = tmp_path_factory.mktemp("offline")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_recipe_dict(tmp, **OFFLINE))
    out = spo("sft", recipe)
    assert out.returncode == 0, out.stderr
    return recipe, tmp / "run" / "warm_start"


@pytest.fixture(scope="module")
def finished(warm, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run in shards of 16 prompts: (its values file, the process result)."""
    recipe, policy = warm
    out = tmp_path_factory.mktemp("finished") / "values.json"
    return out, offline(recipe, policy, out, 16)


def test_uninterrupted_run_writes_every_training_prompt_in_pool_order(warm, finished):
    recipe, policy = warm
    out, result = finished
    assert result.returncode == 0, result.stderr
    values = read_offline_values(out)
    spec = load_recipe(recipe)
    pool = build_task(spec.task, spec.sampling.prompts_per_iteration).train_pool(spec.run.seed)
    assert list(values) == [p.question for p in pool] and len(values) == POOL
    assert all(len(scores) == SAMPLES for scores in values.values())
    flat = [s for scores in values.values() for s in scores]
    assert 0 < sum(1 for s in flat if s > 0) < len(flat), "the warm start should solve some prompts, not all"
    assert f"merged into {POOL} prompts, {POOL * SAMPLES} scores" in result.stdout
    assert [p.name for p in shard_files(out)] == ["shard_00000.json", "shard_00001.json", "shard_00002.json"]
    assert (out.parent / "values.json.shards" / "manifest.json").is_file()

    # Everything is done: a re-run samples nothing and writes the same file.
    first = out.read_bytes()
    again = offline(recipe, policy, out, 16)
    assert again.returncode == 0, again.stderr
    assert "skipping 3 of 3 shards" in again.stdout and "shard 1/3" not in again.stdout
    assert out.read_bytes() == first


def test_other_settings_on_the_same_shards_exit_2_naming_them(warm, finished):
    recipe, policy = warm
    out, result = finished
    assert result.returncode == 0, result.stderr
    before = [(p.name, p.stat().st_mtime_ns) for p in shard_files(out)]
    changed = offline(recipe, policy, out, 16, "--samples-per-prompt", "2", "eval.temperature=1.0")
    assert changed.returncode == 2, changed.stderr
    assert "samples_per_prompt: 4 -> 2" in changed.stderr and "sampling.temperature: 0.6 -> 1.0" in changed.stderr
    assert "values.json.shards" in changed.stderr and "another --out" in changed.stderr
    assert [(p.name, p.stat().st_mtime_ns) for p in shard_files(out)] == before


def kill_after_first_shard(recipe: Path, policy: Path, out: Path, per_shard: int) -> int:
    """Start a run, SIGKILL it as soon as a shard file exists; the number of shards it left."""
    args = ["estimate-values", recipe, "--offline", "--policy", policy, "--out", out, "--prompts-per-shard", str(per_shard)]
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spo_cli", *map(str, args)], cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if shard_files(out):
                    proc.kill()
                    break
                time.sleep(0.002)
        finally:
            proc.kill()
            proc.wait()
    return len(shard_files(out))


def test_a_killed_run_resumes_without_redoing_shards_and_matches_an_uninterrupted_one(warm, tmp_path):
    recipe, policy = warm
    # Smaller shards leave more time to kill between the first and the last; retry rather than pass vacuously.
    for per_shard in (4, 2, 1):
        total = -(-POOL // per_shard)
        out = tmp_path / f"killed_{per_shard}.json"
        left = kill_after_first_shard(recipe, policy, out, per_shard)
        if 1 <= left < total and not out.exists():
            break
    else:
        pytest.fail("every run finished (or never wrote a shard) before it could be killed")
    print(f"killed with {left} of {total} shards of {per_shard} prompts written")
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(out)}

    resumed = offline(recipe, policy, out, per_shard)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping {left} of {total} shards already sampled" in resumed.stdout
    assert {name: stamp for name, stamp in ((p.name, (p.stat().st_ino, p.stat().st_mtime_ns)) for p in shard_files(out)) if name in done} == done
    assert len(shard_files(out)) == total

    whole = tmp_path / f"whole_{per_shard}.json"
    uninterrupted = offline(recipe, policy, whole, per_shard)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert "skipping" not in uninterrupted.stdout
    assert out.read_bytes() == whole.read_bytes()


def test_refusals_exit_2_before_loading_a_model(warm, tmp_path):
    recipe, _ = warm
    out = tmp_path / "values.json"
    no_policy = spo("estimate-values", recipe, "--offline", "--out", out)
    assert no_policy.returncode == 2
    assert "warm_start.kind is sft" in no_policy.stderr and "pass --policy <run_dir>/warm_start" in no_policy.stderr
    assert "spo train" in no_policy.stderr

    data = tiny_recipe_dict(tmp_path)
    data["warm_start"] = {"kind": "none"}
    no_pool = write_recipe(tmp_path / "no_pool.yaml", data)
    result = spo("estimate-values", no_pool, "--offline", "--out", out)
    assert result.returncode == 2 and "set task.train_pool_size" in result.stderr

    result = spo("estimate-values", recipe, "--out", out)
    assert result.returncode == 2 and "missing --in" in result.stderr and "--offline" in result.stderr
    result = spo("estimate-values", recipe, "--in", out, "--out", out, "--prompts-per-shard", "2")
    assert result.returncode == 2 and "--prompts-per-shard: only with --offline" in result.stderr
    assert not out.exists() and not (tmp_path / "values.json.shards").exists()
