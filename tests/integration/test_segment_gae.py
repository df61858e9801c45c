"""Value-network segment SPO (estimator segment_gae) on a tiny local model: entropy segments, a critic trained at
segment starts and checkpointed, `spo estimate-values --critic` reproducing the loop, and the group-mean
fallback without a critic."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from spo_cli.episode import read_episodes, write_episodes
from spo_cli.recipe import parse_recipe

from ..conftest import tiny_recipe_dict
from .test_gae import quiet, read_metrics

SEGMENT_GAE = {
    # percentile 0.2 (batch scope) gives a few segments per response of the tiny task.
    "partitioner": {"kind": "entropy", "percentile": 0.2, "scope": "batch"},
    "estimator": {"kind": "segment_gae", "lam": 0.95, "critic": {"learning_rate": 1e-3}},
    "train": {"iterations": 2, "save_total_limit": None},
    # One-step problems over tiny numbers (as test_chain.py): 150 warm-start steps teach the format and chance
    # gets some right, so groups see both rewards and the advantages are not all zero.
    "task": {"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1],
             "max_start": 3, "max_add": 2, "max_mul": 2},
    "warm_start": {"steps": 150, "learning_rate": 3e-3},
}  # fmt: skip
FALLBACK = {**SEGMENT_GAE, "estimator": {"kind": "segment_gae", "critic": None}}


@pytest.fixture(scope="module")
def segment_gae_run(tmp_path_factory) -> Path:
    from spo_cli.train import train

    root = tmp_path_factory.mktemp("segment_gae")
    train(parse_recipe(tiny_recipe_dict(root, **SEGMENT_GAE)), console=quiet())
    return root / "run"


def test_the_critic_trains_at_segment_starts_and_is_checkpointed(segment_gae_run):
    rows = read_metrics(segment_gae_run)
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("value_loss", "value_grad_norm", "critic/values/mean", "critic/vf_explained_var"):
            assert math.isfinite(r[key]), key
        assert r["segment_gae/fallback"] == 0.0
    for iteration in (1, 2):
        critic = segment_gae_run / "checkpoints" / f"iter_{iteration:06d}" / "critic"
        assert (critic / "model.safetensors").is_file() and (critic / "optimizer.pt").is_file()
    episodes = read_episodes(segment_gae_run / "episodes" / "iter_000002.jsonl")
    assert any(len(ep.segments) > 1 for ep in episodes), "the entropy partitioner should split some responses"
    for ep in episodes:
        n = len(ep.response_token_ids)
        assert len(ep.token_advantages) == len(ep.response_values) == len(ep.value_targets) == n
        starts = {s.start for s in ep.segments}
        assert {t for t, g in enumerate(ep.value_targets) if g is not None} == starts
        for s in ep.segments:
            # one advantage per segment, and its value is the critic's before the segment's first token
            assert set(ep.token_advantages[s.start : s.end]) == {s.advantage}
            assert s.value == ep.response_values[s.start]
    assert any(len({s.advantage for s in ep.segments}) > 1 for ep in episodes), "advantages vary within a response"
    # whitened over the iteration's tokens
    tokens = [a for ep in episodes for a in ep.token_advantages]
    assert sum(tokens) / len(tokens) == pytest.approx(0.0, abs=1e-9)


def test_standalone_estimate_with_the_checkpointed_critic_reproduces_the_loop(segment_gae_run, tmp_path):
    from spo_cli.errors import SpoUserError
    from spo_cli.standalone import estimate_file

    recipe = parse_recipe(tiny_recipe_dict(tmp_path, **SEGMENT_GAE))
    in_loop = read_episodes(segment_gae_run / "episodes" / "iter_000002.jsonl")
    estimated = {"token_advantages": None, "response_values": None, "value_targets": None}
    bare = [ep.model_copy(update=estimated) for ep in in_loop]
    write_episodes(tmp_path / "parted.jsonl", bare)
    # iteration 2 was estimated with the critic as it was after iteration 1
    critic = segment_gae_run / "checkpoints" / "iter_000001" / "critic"
    estimate_file(recipe, tmp_path / "parted.jsonl", tmp_path / "out.jsonl", None, lambda _: None, critic)
    standalone = read_episodes(tmp_path / "out.jsonl")
    assert [ep.token_advantages for ep in standalone] == [ep.token_advantages for ep in in_loop]
    assert [ep.value_targets for ep in standalone] == [ep.value_targets for ep in in_loop]
    with pytest.raises(SpoUserError, match="--critic"):
        estimate_file(recipe, tmp_path / "parted.jsonl", tmp_path / "x.jsonl", None, lambda _: None)
    fallback = parse_recipe(tiny_recipe_dict(tmp_path, **FALLBACK))
    with pytest.raises(SpoUserError, match="reads no critic"):
        estimate_file(fallback, tmp_path / "parted.jsonl", tmp_path / "x.jsonl", None, lambda _: None, critic)


def test_without_a_critic_it_falls_back_to_group_mean_baselines_and_says_so(tmp_path):
    from spo_cli.train import train

    out = io.StringIO()
    train(parse_recipe(tiny_recipe_dict(tmp_path, **FALLBACK)), console=Console(file=out, width=200))
    assert "segment_gae: no value network (estimator.critic is null)" in out.getvalue()
    run = tmp_path / "run"
    assert all(r["segment_gae/fallback"] == 1.0 and "value_loss" not in r for r in read_metrics(run))
    assert not (run / "checkpoints" / "iter_000002" / "critic").exists()
    episodes = read_episodes(run / "episodes" / "iter_000002.jsonl")
    assert len({ep.reward for ep in episodes}) == 2, "the check below needs groups with mixed rewards"
    for ep in episodes:
        assert ep.response_values is None and ep.value_targets is None
        # r - group mean, whitened: one advantage for the whole response, whatever its segments
        assert len(set(ep.token_advantages)) <= 1 and len(ep.token_advantages) == len(ep.response_token_ids)
    by_group: dict[str, list] = {}
    for ep in episodes:
        by_group.setdefault(ep.group_id, []).append(ep)
    for group in by_group.values():
        # within a prompt's group, a higher reward means a higher advantage
        ranked = sorted((ep for ep in group if ep.token_advantages), key=lambda ep: ep.reward)
        for lo, hi in zip(ranked, ranked[1:]):
            if hi.reward > lo.reward:
                assert hi.token_advantages[0] > lo.token_advantages[0]
