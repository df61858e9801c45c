"""End-to-end training on a tiny local model: artifacts, metrics, and kill + resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from spo_cli.recipe import parse_recipe

from ..conftest import tiny_recipe_dict

DETERMINISTIC = ["reward", "accuracy", "policy_loss", "entropy", "grad_norm", "kl", "completions/mean_length", "learning_rate"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics agree at every iteration on everything the seed determines (not timings)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in DETERMINISTIC:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["iteration"], key)


def test_train_writes_every_artifact(tmp_path):
    from rich.console import Console

    from spo_cli.train import train

    recipe = parse_recipe(tiny_recipe_dict(tmp_path, loss={"beta": 0.01, "whiten_advantages": True}))
    summary = train(recipe, console=Console(file=open(os.devnull, "w")))
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "accuracy", "kl", "clip_ratio", "entropy", "tokens_per_second", "time/iteration_s", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["clip_ratio"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["optimizer_steps"] == 4  # 16 episodes / (4 x 2) per step x 2 epochs
    assert rows[0]["kl"] < 1e-3 and rows[-1]["kl"] > 0, "KL to the reference starts at 0 and moves"
    # checkpoints: only the newest 2 kept, each loadable HF format
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert ckpts == ["iter_000002", "iter_000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_000003"
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "optimizer.pt", "trainer_state.json"):
        assert (run / "checkpoints" / "iter_000003" / name).is_file(), name
    assert (run / "warm_start" / "config.json").is_file()
    assert parse_recipe(__import__("yaml").safe_load((run / "recipe.resolved.yaml").read_text())) == recipe
    assert any((run / "tensorboard").iterdir())
    assert len((run / "episodes" / "iter_000002.jsonl").read_text().splitlines()) == 16
    assert (run / "completions.jsonl").is_file()
    assert summary["eval_before"]["num_problems"] == 8 and "sampled_accuracy" in summary["eval_after"]
    assert json.loads((run / "summary.json").read_text())["final_checkpoint"].endswith("iter_000003")


def test_a_run_from_a_saved_warm_start_is_the_run_that_trains_its_own(tmp_path):
    """`warm_start.load_from` (how several runs share one warm start) changes nothing but the time it saves."""
    import io

    from rich.console import Console

    from spo_cli.train import train

    own = train(parse_recipe(tiny_recipe_dict(tmp_path / "own")), console=Console(file=io.StringIO()))
    saved = tmp_path / "own" / "run" / "warm_start"
    log = io.StringIO()
    data = tiny_recipe_dict(tmp_path / "shared", warm_start={"load_from": str(saved)})
    shared = train(parse_recipe(data), console=Console(file=log, width=200))
    assert "supervised fine-tuning" not in log.getvalue() and f"copying {saved}" in log.getvalue()
    copy = tmp_path / "shared" / "run" / "warm_start"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "warm_start.json", "sft_stats.json"):
        assert (copy / name).read_bytes() == (saved / name).read_bytes(), name
    assert_same_metrics(read_metrics(tmp_path / "own" / "run"), read_metrics(tmp_path / "shared" / "run"))
    assert shared["eval_before"] == own["eval_before"] and shared["eval_after"] == own["eval_after"]


@pytest.mark.parametrize(
    "task",
    [
        {"kind": "gsm8k", "train_file": "gsm8k/train.jsonl", "test_file": "gsm8k/test.jsonl"},
        {"kind": "math", "train_file": "math/train.jsonl", "test_file": "math500/test.jsonl", "use_chat_template": True},
    ],
    ids=["gsm8k", "math"],
)
def test_one_iteration_on_real_data_files(tmp_path, task):
    """The file-backed tasks run through the whole loop (untrained model, so rewards are ~0)."""
    from rich.console import Console

    from spo_cli.train import train

    from ..conftest import DATA

    if not DATA.is_dir():
        pytest.skip("../shared/data not present")
    task = {**task, "train_file": str(DATA / task["train_file"]), "test_file": str(DATA / task["test_file"])}
    data = tiny_recipe_dict(tmp_path, train={"iterations": 1}, eval={"num_samples": 1})
    data["task"] = {**task, "max_train_problems": 16, "max_eval_problems": 4}
    data["warm_start"] = {"kind": "none"}
    data["sampling"]["max_prompt_length"] = 2000
    summary = train(parse_recipe(data), console=Console(file=open(os.devnull, "w")))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["num_prompts"] == 4
    assert summary["eval_after"]["num_problems"] == 4
    episodes = (tmp_path / "run" / "episodes" / "iter_000001.jsonl").read_text().splitlines()
    first = json.loads(episodes[0])
    assert first["gold"] and first["prompt"].startswith("[MATH_TASK]" if task["kind"] == "gsm8k" else "<|im_start|>user")


def test_bf16_autocast_forward_on_cpu(tiny_policy):
    import torch

    from spo_cli.hardware import Runtime, cpu_has_native_bf16
    from spo_cli.policy import collate, forward_logprobs

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    model, _ = tiny_policy
    batch = collate([[5, 6, 7]], [[8, 9, 10]], pad_id=0)
    with torch.no_grad():
        fp32, _ = forward_logprobs(model, batch, 1.0)
        with Runtime("cpu", bf16=True).autocast():
            bf16, _ = forward_logprobs(model, batch, 1.0)
    assert bf16.dtype == torch.float32 and torch.allclose(fp32, bf16, atol=5e-2)


def test_a_time_budget_stops_the_run_checkpointed_and_evaluated(tmp_path):
    from rich.console import Console

    from spo_cli.checkpoint import latest_checkpoint
    from spo_cli.train import train

    # Any iteration takes longer than a millisecond: the budget runs out after the first.
    recipe = parse_recipe(tiny_recipe_dict(tmp_path, train={"iterations": 3, "time_budget_s": 0.001}, eval={"eval_steps": 1}))
    quiet = Console(file=open(os.devnull, "w"))
    summary = train(recipe, console=quiet)
    run = tmp_path / "run"
    assert summary["iterations"] == 1
    assert [r["iteration"] for r in read_metrics(run)] == [1]
    assert "eval/greedy_accuracy" not in read_metrics(run)[0]  # the last iteration's evaluation is eval_after
    assert latest_checkpoint(run).name == "iter_000001"
    assert json.loads((run / "eval_after.json").read_text())["iteration"] == 1
    # Resumed, it has no time left: nothing more runs and the summary is the same.
    again = train(recipe, resume=True, console=quiet)
    assert again["iterations"] == 1 and again["eval_after"] == summary["eval_after"]
    assert [r["iteration"] for r in read_metrics(run)] == [1]
    # The summary's time is the run's iterations', not the resumed process's few milliseconds.
    assert again["rl_seconds"] == summary["rl_seconds"] == read_metrics(run)[0]["time/iteration_s"]
    assert again["rl_seconds_this_start"] < summary["rl_seconds"]


def test_eval_every_s_evaluates_at_wall_time_marks(tmp_path):
    from rich.console import Console

    from spo_cli.train import train

    # Every iteration takes longer than a millisecond, so each one passes a mark; the last one's is eval_after.
    recipe = parse_recipe(tiny_recipe_dict(tmp_path, train={"iterations": 3}, eval={"eval_every_s": 0.001}))
    train(recipe, console=Console(file=open(os.devnull, "w")))
    records = read_metrics(tmp_path / "run")
    assert ["eval/greedy_accuracy" in r for r in records] == [True, True, False]
    assert sorted(p.name for p in (tmp_path / "run").glob("eval_iter_*.json")) == [
        "eval_iter_000001.json", "eval_iter_000002.json"
    ]


def test_an_update_to_non_finite_weights_stops_the_run_before_its_checkpoint(tmp_path):
    import torch

    from spo_cli.errors import SpoError
    from spo_cli.train import _check_finite_weights

    model = torch.nn.Linear(3, 2)
    _check_finite_weights(model, 1, tmp_path)  # finite: nothing happens
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(SpoError, match="iteration 4: the update made the policy's weights non-finite") as caught:
        _check_finite_weights(model, 4, tmp_path)
    assert caught.value.exit_code == 1 and "none (start again)" in str(caught.value)
