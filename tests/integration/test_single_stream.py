"""Single-stream SPO end to end on a tiny local model: offline values, prioritised sampling, tracker resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from spo_cli.recipe import parse_recipe
from spo_cli.estimate.single_stream.tracker import TRACKER_FILE

from ..conftest import tiny_recipe_dict

# One-operation problems after a longer warm start: rewards are mixed, so the advantages are not all 0, the
# policy moves and D > 0.
SINGLE_STREAM = dict(
    task={"train_pool_size": 12, "min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1},
    warm_start={"steps": 300, "batch_size": 16, "log_every": 100},
    sampling={"prompts_per_iteration": 6, "num_generations": 1},
    estimator={"kind": "single_stream", "offline_samples": 2},
    loss={"epsilon_high": 0.28, "clip_ratio_c": 10.0},
    optim={"learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_steps": 0},
    train={"iterations": 4, "save_steps": 1, "save_total_limit": None, "ppo_epochs": 1},
    eval={"before_training": False, "after_training": False},
)


def run(recipe_dict: dict, resume: bool = False) -> str:
    from spo_cli.train import train

    out = io.StringIO()
    train(parse_recipe(recipe_dict), resume=resume, console=Console(file=out, width=200))
    return out.getvalue()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tracker_state(run_dir: Path, iteration: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"iter_{iteration:06d}" / TRACKER_FILE).read_text())


def test_resumed_run_restores_the_tracker_exactly(tmp_path):
    full = tiny_recipe_dict(tmp_path / "full", **SINGLE_STREAM)
    log = run(full)
    full_dir = tmp_path / "full" / "run"
    assert "estimating offline values" in log
    offline = json.loads((full_dir / "offline_values.json").read_text())
    assert len(offline) == 12 and all(len(scores) == 2 for scores in offline.values())

    rows = metrics(full_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["optimizer_steps"] for r in rows) >= 3, "the policy must move for D to mean anything"
    for r in rows:
        assert 0.875 <= r["single_stream/rho"] <= 0.96
        assert r["single_stream/D"] >= 0
    assert max(r["single_stream/D"] for r in rows[1:]) > 0, "revisited prompts measure how far the policy moved"
    assert rows[0]["single_stream/first_visit_ratio"] == 1.0  # nothing was visited before iteration 1
    assert rows[0]["single_stream/rho"] == 0.96  # D = 0 on first visits
    episodes = [json.loads(line) for line in (full_dir / "episodes" / "iter_000002.jsonl").read_text().splitlines()]
    assert len(episodes) == 6 and len({ep["metadata"]["single_stream"]["key"] for ep in episodes}) == 6
    state = tracker_state(full_dir, 4)
    assert sum(b["visits"] for b in state["beliefs"].values()) == 4 * 6
    # A later checkpoint moved the tracker: the checkpoint really holds the live state.
    assert tracker_state(full_dir, 2) != state

    # The same run stopped after 2 iterations, then resumed to 4. It starts from the first run's warm start (the
    # same settings and seed make the same one) to save its time.
    part = tiny_recipe_dict(tmp_path / "part", **SINGLE_STREAM)
    part["train"] = {**part["train"], "iterations": 2}
    part["warm_start"] = {**part["warm_start"], "load_from": str(full_dir / "warm_start")}
    run(part)
    part["train"]["iterations"] = 4
    log = run(part, resume=True)
    part_dir = tmp_path / "part" / "run"
    assert "restored 12 prompt values" in log
    for iteration in (2, 3, 4):
        assert tracker_state(part_dir, iteration) == tracker_state(full_dir, iteration), iteration
    for a, b in zip(rows, metrics(part_dir)):
        assert a.keys() == b.keys()
        for key in ("reward", "policy_loss", "single_stream/value", "single_stream/rho", "single_stream/D"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["iteration"], key)


def test_prompts_without_offline_values_are_never_drawn(tmp_path):
    from spo_cli.tasks import build_task

    recipe = tiny_recipe_dict(tmp_path, **SINGLE_STREAM)
    spec = parse_recipe(recipe)
    task = build_task(spec.task, spec.sampling.prompts_per_iteration)
    keys = [task.format_prompt(p.question) for p in task.train_pool(spec.run.seed)]
    known = keys[:8]
    values = tmp_path / "values.json"
    values.write_text(json.dumps({k: [1.0, 0.0, 0.0] for k in known}))
    recipe["estimator"] = {"kind": "single_stream", "offline_values": str(values), "offline_samples": 8}
    recipe["train"] = {**recipe["train"], "iterations": 3}
    recipe["warm_start"] = {"kind": "sft", "steps": 20, "batch_size": 8}
    log = run(recipe)
    assert "4 training prompts have no offline value" in log
    assert "8 prompts have fewer than 8 offline scores" in log
    drawn = set()
    for i in (1, 2, 3):
        path = tmp_path / "run" / "episodes" / f"iter_{i:06d}.jsonl"
        drawn |= {json.loads(line)["metadata"]["single_stream"]["key"] for line in path.read_text().splitlines()}
    assert drawn <= set(known)
    state = json.loads((tmp_path / "run" / "checkpoints" / "iter_000003" / TRACKER_FILE).read_text())
    assert set(state["beliefs"]) == set(known)
