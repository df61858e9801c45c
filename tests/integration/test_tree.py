"""SPO-tree on a tiny local model: the training loop, its resume (replay buffer included) and the standalone command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from rich.console import Console

from spo_cli.episode import read_episodes, write_episodes
from spo_cli.estimate import estimate_advantages
from spo_cli.partition import partition_episodes
from spo_cli.recipe import Whole, parse_recipe

from ..conftest import REPO, tiny_recipe_dict, write_recipe

TREE = {
    "estimator": {"kind": "mc_tree", "branching": [3, 2, 2], "segment_tokens": 3, "replay": {"edges_per_question": 6}},
    "loss": {"use_prob_mask": True, "prob_mask_rho": 0.9},
    "train": {"iterations": 3, "episodes_per_iteration": 16, "save_steps": 1, "save_total_limit": None},
    "task": {"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1],
             "max_start": 3, "max_add": 2, "max_mul": 2},
    "warm_start": {"steps": 150, "learning_rate": 3e-3},
    "eval": {"before_training": False, "after_training": False},
}  # fmt: skip

QUIET = Console(file=open(os.devnull, "w"))


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tree_training_and_resume_restore_the_replay_buffer(tmp_path):
    from spo_cli.train import train

    full = parse_recipe(tiny_recipe_dict(tmp_path / "full", **TREE))
    train(full, console=QUIET)
    run = tmp_path / "full" / "run"
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["tree/nodes"] <= 4 * (3 + 3 * 2 + 3 * 2 * 2) and first["tree/leaves"] > 0
    assert first["trained_episodes"] == 16 and first["optimizer_steps"] > 0
    nodes = read_episodes(run / "trees" / "iter_000001.jsonl")
    assert {ep.metadata["tree"]["depth"] for ep in nodes} <= {1, 2, 3}
    trained = read_episodes(run / "episodes" / "iter_000001.jsonl")
    assert len(trained) == 16 and all(ep.segments[0].advantage != 0 for ep in trained)
    # Edges left in the buffer travel with the checkpoint.
    assert (run / "checkpoints" / "iter_000002" / "replay.json").is_file()

    # Stop after 2 iterations, resume to 3: the replay buffer and everything else come back.
    part = tiny_recipe_dict(tmp_path / "part", **TREE)
    part["train"]["iterations"] = 2
    part["optim"]["schedule_iterations"] = 3  # the learning-rate schedule of the full run
    train(parse_recipe(part), console=QUIET)
    part["train"]["iterations"] = 3
    train(parse_recipe(part), resume=True, console=QUIET)
    resumed = tmp_path / "part" / "run"
    assert metrics(resumed)[2]["replay/size"] == rows[2]["replay/size"]
    assert [ep.id for ep in read_episodes(resumed / "episodes" / "iter_000003.jsonl")] == [
        ep.id for ep in read_episodes(run / "episodes" / "iter_000003.jsonl")
    ]
    a = torch.load(run / "checkpoints" / "iter_000003" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(resumed / "checkpoints" / "iter_000003" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a), "the resumed run trained differently"


def test_standalone_tree_from_a_prompt_file_reproduces_the_loop(tmp_path):
    from spo_cli.credit import tree_credit_metrics
    from spo_cli.train import train

    data = tiny_recipe_dict(tmp_path, **{**TREE, "train": {**TREE["train"], "iterations": 1}})
    recipe = parse_recipe(data)
    train(recipe, console=QUIET)
    run = tmp_path / "run"
    nodes = read_episodes(run / "trees" / "iter_000001.jsonl")
    in_loop, _ = estimate_advantages(partition_episodes(nodes, Whole(), None), recipe.estimator)
    assert in_loop, "the tiny run should have some edges with a non-zero advantage"
    # The loop logged the credit of its wrong root-to-leaf paths; the saved trees carry each one's first wrong token.
    wrong = [ep for ep in nodes if ep.metadata["tree"]["leaf"] and ep.reward < 1.0]
    assert wrong and all("path_first_error" in ep.metadata["tree"] for ep in wrong)
    logged = {k: v for k, v in metrics(run)[0].items() if k.startswith("credit/")}
    assert logged == tree_credit_metrics(nodes, in_loop) and "credit/wrong_responses" in logged
    write_episodes(tmp_path / "parted.jsonl", partition_episodes(nodes, Whole(), None))
    saved = subprocess.run(
        [sys.executable, "-m", "spo_cli", "estimate-values", str(write_recipe(tmp_path / "saved.yaml", data)),
         "--in", str(tmp_path / "parted.jsonl"), "--out", str(tmp_path / "saved_edges.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    assert f"credit/wrong_responses {logged['credit/wrong_responses']:g}" in saved.stdout  # the same, offline

    # The iteration's prompts, in order, as a prompt file.
    roots = {}
    for ep in nodes:
        if ep.metadata["tree"]["depth"] == 1:
            roots.setdefault(ep.group_id, {"id": ep.metadata["tree"]["question"], "prompt": ep.prompt, "gold": ep.gold})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in roots.values()))
    recipe_file = write_recipe(tmp_path / "recipe.yaml", data)
    out = subprocess.run(
        [sys.executable, "-m", "spo_cli", "estimate-values", str(recipe_file), "--in", str(prompts),
         "--out", str(tmp_path / "edges.jsonl"), "--policy", str(run / "warm_start"), "--iteration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    standalone = read_episodes(tmp_path / "edges.jsonl")
    assert [ep.id for ep in standalone] == [ep.id for ep in in_loop]
    assert [ep.response_token_ids for ep in standalone] == [ep.response_token_ids for ep in in_loop]
    assert [ep.segments for ep in standalone] == [ep.segments for ep in in_loop]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "spo_cli", "estimate-values", str(recipe_file), "--in", str(bad), "--out", str(tmp_path / "x.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2 and "bad.jsonl:1: missing `gold`" in out.stderr
