"""SPO-chain on a tiny local model: the training loop's in-loop stages versus the standalone commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from rich.console import Console

from spo_cli.credit import credit_metrics
from spo_cli.episode import read_episodes, write_episodes
from spo_cli.recipe import parse_recipe

from ..conftest import REPO, tiny_recipe_dict, write_recipe

CHAIN = {
    "partitioner": {"kind": "cutpoint", "rho": 0.9, "interval": 2},
    "estimator": {"kind": "mc_chain", "rollouts": 3},
    "loss": {"use_prob_mask": True, "prob_mask_rho": 0.9},
    "train": {"iterations": 1},
    # One-step problems over tiny numbers: 150 warm-start steps teach the format, and chance gets some right,
    # so rollouts see both rewards and the advantages are not all zero.
    "task": {"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1],
             "max_start": 3, "max_add": 2, "max_mul": 2},
    "warm_start": {"steps": 150, "learning_rate": 3e-3},
}


def spo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_standalone_partition_and_estimate_reproduce_the_training_loop(tmp_path):
    from spo_cli.train import train

    data = tiny_recipe_dict(tmp_path, **CHAIN)
    recipe = parse_recipe(data)
    train(recipe, console=Console(file=open(os.devnull, "w")))
    run = tmp_path / "run"
    in_loop = read_episodes(run / "episodes" / "iter_000001.jsonl")
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["mc/unique_states"] <= metrics["mc/states"] and metrics["mc/states"] > 0
    # The iteration's generated tokens: its responses plus every rollout token (at least one per rollout).
    responses = sum(len(ep.response_token_ids) for ep in in_loop)
    rollouts = CHAIN["estimator"]["rollouts"] * metrics["mc/unique_states"]
    assert metrics["mc/generated_tokens"] >= rollouts
    assert metrics["tokens/generated"] == responses + metrics["mc/generated_tokens"]

    # Strip what the partition and estimate stages wrote, then redo them with the commands.
    bare = [ep.model_copy(update={"segments": None, "token_advantages": None}) for ep in in_loop]
    write_episodes(tmp_path / "sampled.jsonl", bare)
    recipe_file = write_recipe(tmp_path / "recipe.yaml", data)
    policy = str(run / "warm_start")  # iteration 1 samples and rolls out with the warm-started policy
    out = spo("partition", str(recipe_file), "--in", str(tmp_path / "sampled.jsonl"), "--out", str(tmp_path / "parted.jsonl"))
    assert out.returncode == 0, out.stderr
    out = spo(
        "estimate-values", str(recipe_file), "--in", str(tmp_path / "parted.jsonl"),
        "--out", str(tmp_path / "estimated.jsonl"), "--policy", policy,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    standalone = read_episodes(tmp_path / "estimated.jsonl")

    assert [ep.segments for ep in standalone] == [ep.segments for ep in in_loop]
    assert [ep.token_advantages for ep in standalone] == [ep.token_advantages for ep in in_loop]
    # The comparison is not vacuous: some tokens carry a non-zero chain advantage ...
    advantages = [a for ep in in_loop for a in ep.token_advantages]
    assert any(a != 0 for a in advantages)
    # ... and the reference's zeroing holds: a token with p > rho has advantage 0.
    for ep in in_loop:
        for lp, a in zip(ep.response_logprobs, ep.token_advantages):
            if math.exp(lp) > 0.9:
                assert a == 0.0

    # Credit against ground truth: the arithmetic task marks where each wrong response departs from the solution,
    # the loop logs the credit metrics of its advantages, and the standalone estimate prints the same figures.
    assert any(ep.first_error is not None for ep in in_loop) and all(
        ep.first_error is None for ep in in_loop if ep.reward == 1.0
    )
    credit = {k: v for k, v in metrics.items() if k.startswith("credit/")}
    assert credit == credit_metrics(in_loop) and "credit/wrong_responses" in credit
    assert f"credit/wrong_responses {credit['credit/wrong_responses']:g}" in out.stdout
    # The same episodes under a response-level baseline: one advantage on every token puts blame before the
    # first error exactly in proportion to the tokens there.
    out = spo(
        "estimate-values", str(recipe_file), "estimator.kind=rloo", "--in", str(tmp_path / "parted.jsonl"),
        "--out", str(tmp_path / "rloo.jsonl"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rloo = credit_metrics(read_episodes(tmp_path / "rloo.jsonl"))
    assert rloo["credit/misplaced_blame"] == pytest.approx(rloo["credit/uniform_blame"])


def test_partition_scores_episodes_without_logprobs(tmp_path):
    from spo_cli.train import train

    data = tiny_recipe_dict(tmp_path, **CHAIN)
    data["estimator"] = {"kind": "group"}
    train(parse_recipe(data), console=Console(file=open(os.devnull, "w")))
    run = tmp_path / "run"
    sampled = read_episodes(run / "episodes" / "iter_000001.jsonl")
    foreign = [ep.model_copy(update={"response_logprobs": None, "response_entropies": None, "segments": None}) for ep in sampled]
    write_episodes(tmp_path / "foreign.jsonl", foreign)
    recipe_file = write_recipe(tmp_path / "recipe.yaml", data)
    out = spo(
        "partition", str(recipe_file), "--in", str(tmp_path / "foreign.jsonl"), "--out", str(tmp_path / "parted.jsonl"),
        "--policy", str(run / "warm_start"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "scoring 16 episodes" in out.stdout
    scored = read_episodes(tmp_path / "parted.jsonl")
    for a, b in zip(scored, sampled):
        assert len(a.response_logprobs) == len(b.response_logprobs)
        assert all(abs(x - y) < 1e-3 for x, y in zip(a.response_logprobs, b.response_logprobs))
        assert a.segments is not None and a.segments[-1].end == len(a.response_token_ids)


def test_vineppo_in_the_loop_and_standalone(tmp_path):
    from spo_cli.train import train

    data = tiny_recipe_dict(tmp_path, **CHAIN)
    data["partitioner"] = {"kind": "step"}
    data["estimator"] = {"kind": "vineppo", "rollouts": 3}
    data["loss"] = {"use_prob_mask": False}
    train(parse_recipe(data), console=Console(file=open(os.devnull, "w")))
    run = tmp_path / "run"
    in_loop = read_episodes(run / "episodes" / "iter_000001.jsonl")
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # Every step start is a state (the prompt and after each step, all within the default cap of 25).
    assert metrics["mc/states"] == sum(len(ep.segments) for ep in in_loop)
    for ep in in_loop:
        steps = ep.segments
        for this, nxt in zip(steps, steps[1:]):
            assert this.advantage == nxt.value - this.value
        assert steps[-1].advantage == ep.reward - steps[-1].value
    assert any(s.advantage != 0 for ep in in_loop for s in ep.segments)

    bare = [ep.model_copy(update={"segments": [s.model_copy(update={"advantage": None, "value": None}) for s in ep.segments]}) for ep in in_loop]
    write_episodes(tmp_path / "parted.jsonl", bare)
    recipe_file = write_recipe(tmp_path / "recipe.yaml", data)
    out = spo(
        "estimate-values", str(recipe_file), "--in", str(tmp_path / "parted.jsonl"),
        "--out", str(tmp_path / "estimated.jsonl"), "--policy", str(run / "warm_start"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [ep.segments for ep in read_episodes(tmp_path / "estimated.jsonl")] == [ep.segments for ep in in_loop]
