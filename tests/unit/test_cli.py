"""The command line: exit codes, error messages, and the standalone stage commands on episode files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spo_cli.episode import read_episodes, write_episodes

from ..conftest import REPO, tiny_recipe_dict, write_recipe
from .test_episode import make_episode


def spo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_recipe_check_exit_codes(tmp_path):
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe_dict(tmp_path))
    bad_data = tiny_recipe_dict(tmp_path)
    bad_data["sampling"]["temperatur"] = 1.0
    bad = write_recipe(tmp_path / "bad.yaml", bad_data)
    ok = spo("recipe", "check", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout
    out = spo("recipe", "check", str(good), str(bad))
    assert out.returncode == 2
    assert "sampling.temperatur" in out.stderr and "unknown field" in out.stderr and "line" in out.stderr


@pytest.mark.parametrize("argv", [["train", "recipes/tiny_arith_grpo.yaml", "--bogus"], ["nope"], ["eval"]])
def test_a_usage_error_is_exit_code_2_without_a_traceback(argv):
    """typer raises its own copy of click's usage errors: they were a traceback with exit code 1."""
    out = spo(*argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Usage:" in out.stderr


def test_train_with_bad_recipe_exits_2_and_creates_nothing(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    data["optim"]["learning_rate"] = -1
    bad = write_recipe(tmp_path / "bad.yaml", data)
    out = spo("train", str(bad))
    assert out.returncode == 2
    assert "optim.learning_rate" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
    out = spo("train", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "recipe file not found" in out.stderr
    out = spo("train", str(write_recipe(tmp_path / "ok.yaml", tiny_recipe_dict(tmp_path))), "train.iterations=zero")
    assert out.returncode == 2 and "train.iterations" in out.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_show_applies_overrides_and_schema_is_json(tmp_path):
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe_dict(tmp_path))
    out = spo("recipe", "show", str(good), "sampling.temperature=0.25")
    assert out.returncode == 0 and "temperature: 0.25" in out.stdout and "epsilon: 0.2" in out.stdout
    schema = spo("recipe", "schema")
    assert schema.returncode == 0 and '"Recipe"' in schema.stdout


def test_standalone_partition_and_estimate(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path))
    eps = [make_episode(id=str(i), group_id="g", reward=float(i % 2)) for i in range(4)]
    write_episodes(tmp_path / "sampled.jsonl", eps)
    out = spo("partition", str(recipe), "--in", str(tmp_path / "sampled.jsonl"), "--out", str(tmp_path / "parted.jsonl"))
    assert out.returncode == 0, out.stderr
    out = spo("estimate-values", str(recipe), "--in", str(tmp_path / "parted.jsonl"), "--out", str(tmp_path / "est.jsonl"))
    assert out.returncode == 0, out.stderr
    advantages = [ep.segments[0].advantage for ep in read_episodes(tmp_path / "est.jsonl")]
    # rewards [0, 1, 0, 1]: mean 0.5, population std 0.5
    assert advantages == [pytest.approx(-1.0), pytest.approx(1.0), pytest.approx(-1.0), pytest.approx(1.0)]
    # estimating episodes that were never partitioned is a user error naming the file
    out = spo("estimate-values", str(recipe), "--in", str(tmp_path / "sampled.jsonl"), "--out", str(tmp_path / "x.jsonl"))
    assert out.returncode == 2 and "sampled.jsonl" in out.stderr and "partition" in out.stderr
    (tmp_path / "broken.jsonl").write_text("{}\n")
    out = spo("partition", str(recipe), "--in", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "y.jsonl"))
    assert out.returncode == 2 and "broken.jsonl:1" in out.stderr


def test_hub_model_offline_fails_fast_naming_the_field(monkeypatch):
    import time

    from spo_cli.errors import SpoUserError
    from spo_cli.models import load_pretrained
    from spo_cli.recipe import PretrainedModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SpoUserError) as exc:
        load_pretrained(PretrainedModel(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"))
    assert time.perf_counter() - start < 10
    assert "model.name_or_path" in str(exc.value) and "kind: tiny" in str(exc.value)
    with pytest.raises(SpoUserError, match="no such model directory"):
        load_pretrained(PretrainedModel.model_construct(name_or_path="./no/such/dir"))
    with pytest.raises(ValueError, match="no such model directory"):  # a recipe names the field before anything runs
        PretrainedModel(name_or_path="./no/such/dir")


def test_sft_refuses_a_recipe_whose_warm_start_is_loaded(tmp_path):
    from spo_cli.recipe import WARM_START_RECORD, parse_recipe, warm_start_record

    data = tiny_recipe_dict(tmp_path)
    made = parse_recipe(data)
    saved = tmp_path / "warm_start"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    (saved / WARM_START_RECORD).write_text(json.dumps(warm_start_record(made.model, made.warm_start, made.task, 0)))
    data["warm_start"]["load_from"] = str(saved)
    out = spo("sft", str(write_recipe(tmp_path / "r.yaml", data)))
    assert out.returncode == 2 and "warm_start.load_from" in out.stderr and "made already" in out.stderr
    assert not (tmp_path / "run").exists()


def test_estimate_values_refuses_a_flag_of_the_other_mode_naming_its_mode(tmp_path):
    """`spo estimate-values` estimates saved episodes (--in, --critic, --iteration) or, with --offline, samples
    single-stream SPO's offline values (--samples-per-prompt, --prompts-per-shard, --max-scores-per-prompt)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path))
    out = tmp_path / "out.json"
    offline = spo("estimate-values", str(recipe), "--offline", "--out", str(out), "--iteration", "3", "--critic", "c")
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert "--critic, --iteration: only when estimating saved episodes (--in), not with --offline" in offline.stderr
    episodes = spo("estimate-values", str(recipe), "--in", str(out), "--out", str(out), "--max-scores-per-prompt", "2")
    assert episodes.returncode == 2 and "--max-scores-per-prompt: only with --offline" in episodes.stderr
    assert not out.exists()
