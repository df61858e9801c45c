"""PPO with a critic (estimator gae) on a tiny local model: the critic trains, is checkpointed, resumes exactly,
and `spo estimate-values --critic` reproduces the loop's advantages."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spo_cli.episode import read_episodes, write_episodes
from spo_cli.recipe import parse_recipe

from ..conftest import tiny_recipe_dict

GAE = {
    "estimator": {"kind": "gae", "critic": {"learning_rate": 1e-3}},
    "train": {"iterations": 3, "save_total_limit": None},
}


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def critic_state(checkpoint: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "critic" / "model.safetensors")
    return weights, torch.load(checkpoint / "critic" / "optimizer.pt", weights_only=True)


@pytest.fixture(scope="module")
def gae_run(tmp_path_factory) -> Path:
    from spo_cli.train import train

    root = tmp_path_factory.mktemp("gae")
    train(parse_recipe(tiny_recipe_dict(root, **GAE)), console=quiet())
    return root / "run"


def test_the_critic_trains_and_is_checkpointed(gae_run):
    rows = read_metrics(gae_run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("value_loss", "value_grad_norm", "critic/values/mean", "critic/vf_explained_var"):
            assert math.isfinite(r[key]), key
        assert r["value_loss"] > 0 and 0 <= r["value_clipfrac"] <= 1
    first, _ = critic_state(gae_run / "checkpoints" / "iter_000001")
    last, _ = critic_state(gae_run / "checkpoints" / "iter_000003")
    assert not torch.equal(first["head.weight"], last["head.weight"])
    assert not torch.equal(first["backbone.embed_tokens.weight"], last["backbone.embed_tokens.weight"])
    for ep in read_episodes(gae_run / "episodes" / "iter_000002.jsonl"):
        assert len(ep.response_values) == len(ep.value_targets) == len(ep.token_advantages) == len(ep.response_token_ids)


def test_a_resumed_run_ends_with_the_critic_of_the_uninterrupted_one(gae_run, tmp_path):
    from spo_cli.train import train

    # A copy of the run that lost its last checkpoint, as if killed during iteration 3.
    resumed = tmp_path / "run"
    shutil.copytree(gae_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_000003")
    (resumed / "checkpoints" / "latest").write_text("iter_000002\n")
    train(parse_recipe(tiny_recipe_dict(tmp_path, **GAE)), resume=True, console=quiet())

    weights, optimizer = critic_state(gae_run / "checkpoints" / "iter_000003")
    weights_again, optimizer_again = critic_state(resumed / "checkpoints" / "iter_000003")
    assert weights.keys() == weights_again.keys()
    for key in weights:
        assert torch.equal(weights[key], weights_again[key]), key
    for param, state in optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, optimizer_again["state"][param][key]), (param, key)
    a, b = read_metrics(gae_run)[-1], read_metrics(resumed)[-1]
    for key in ("value_loss", "value_clipfrac", "critic/vf_explained_var", "policy_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_standalone_estimate_with_the_checkpointed_critic_reproduces_the_loop(gae_run, tmp_path):
    from spo_cli.errors import SpoUserError
    from spo_cli.standalone import estimate_file

    recipe = parse_recipe(tiny_recipe_dict(tmp_path, **GAE))
    in_loop = read_episodes(gae_run / "episodes" / "iter_000003.jsonl")
    bare = [ep.model_copy(update={"token_advantages": None, "response_values": None, "value_targets": None}) for ep in in_loop]
    write_episodes(tmp_path / "parted.jsonl", bare)
    # iteration 3 was estimated with the critic as it was after iteration 2
    critic = gae_run / "checkpoints" / "iter_000002" / "critic"
    estimate_file(recipe, tmp_path / "parted.jsonl", tmp_path / "out.jsonl", None, lambda _: None, critic)
    standalone = read_episodes(tmp_path / "out.jsonl")
    assert [ep.token_advantages for ep in standalone] == [ep.token_advantages for ep in in_loop]
    assert [ep.value_targets for ep in standalone] == [ep.value_targets for ep in in_loop]
    with pytest.raises(SpoUserError, match="--critic"):
        estimate_file(recipe, tmp_path / "parted.jsonl", tmp_path / "x.jsonl", None, lambda _: None)
