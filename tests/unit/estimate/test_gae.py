"""Token-level GAE (estimator.kind=gae), checked against the worked example of
docs/algorithms.md#segment-gae-worked-example."""

from __future__ import annotations

import pytest

from spo_cli.episode import Segment
from spo_cli.estimate import estimate_advantages, gae_advantages
from spo_cli.estimate.gae import estimate_gae, explained_variance
from spo_cli.recipe import Gae

from ..test_episode import make_episode

# The worked example's sequence A (docs/algorithms.md#segment-gae-worked-example): values at the three step starts,
# the outcome reward on the last step.
VALUES = [0.5, 0.4, 0.7]
REWARDS = [0.0, 0.0, 1.0]


def test_spec_example_lambda_095():
    # delta = [0.4 - 0.5, 0.7 - 0.4, 1 - 0.7] = [-0.1, 0.3, 0.3]
    # A2 = 0.3; A1 = 0.3 + 0.95 * 0.3 = 0.585; A0 = -0.1 + 0.95 * 0.585 = 0.45575
    advantages, returns = gae_advantages(REWARDS, VALUES, gamma=1.0, lam=0.95)
    assert advantages == pytest.approx([0.45575, 0.585, 0.3], abs=1e-12)
    assert returns == pytest.approx([0.95575, 0.985, 1.0], abs=1e-12)


def test_lambda_one_gives_monte_carlo_returns():
    advantages, returns = gae_advantages(REWARDS, VALUES, gamma=1.0, lam=1.0)
    assert advantages == pytest.approx([0.5, 0.6, 0.3], abs=1e-12)
    assert returns == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_discount_and_one_step_td():
    # gamma 0.5, lam 1, V = 0: A_k = 0.5^(2-k) * r, the discounted return.
    advantages, returns = gae_advantages(REWARDS, [0.0, 0.0, 0.0], gamma=0.5, lam=1.0)
    assert advantages == pytest.approx([0.25, 0.5, 1.0]) and returns == pytest.approx([0.25, 0.5, 1.0])
    # lam 0: A_k = delta_k = r_k + gamma * V_{k+1} - V_k; V after the last step is 0.
    advantages, returns = gae_advantages(REWARDS, VALUES, gamma=0.5, lam=0.0)
    assert advantages == pytest.approx([0.5 * 0.4 - 0.5, 0.5 * 0.7 - 0.4, 1.0 - 0.7])
    assert returns == pytest.approx([0.2, 0.35, 1.0])


def test_empty_and_mismatched():
    assert gae_advantages([], [], 1.0, 0.95) == ([], [])
    with pytest.raises(ValueError, match="2 rewards but 3 values"):
        gae_advantages([0.0, 1.0], VALUES, 1.0, 0.95)


def test_explained_variance():
    targets = [0.0, 1.0, 2.0, 3.0]
    assert explained_variance(targets, targets) == pytest.approx(1.0)
    # A constant at the targets' mean explains nothing; var(targets) = 1.25.
    assert explained_variance([1.5] * 4, targets) == pytest.approx(1 - 1.25 / (1.25 + 1e-5))
    assert explained_variance([3.0, 2.0, 1.0, 0.0], targets) < 0


def test_estimate_gae_on_a_tiny_episode():
    # Three response tokens in two segments [0, 1) and [1, 3); reward 1 on the last token.
    ep = make_episode(segments=[Segment(start=0, end=1), Segment(start=1, end=3)])
    empty = make_episode(id="e1", response_token_ids=[], response_logprobs=[], reward=0.0, segments=[])
    (out, out_empty), metrics = estimate_gae([ep, empty], [VALUES, []], gamma=1.0, lam=0.95)
    assert out.token_advantages == pytest.approx([0.45575, 0.585, 0.3], abs=1e-12)
    assert out.value_targets == pytest.approx([0.95575, 0.985, 1.0], abs=1e-12)
    assert out.response_values == VALUES
    # a segment's advantage is its first token's; its value is V at its start
    assert [s.advantage for s in out.segments] == pytest.approx([0.45575, 0.585], abs=1e-12)
    assert [s.value for s in out.segments] == [0.5, 0.4]
    assert out_empty.token_advantages == [] and out_empty.value_targets == [] and out_empty.segments == []
    assert metrics["critic/values/mean"] == pytest.approx(1.6 / 3)
    assert metrics["critic/returns/mean"] == pytest.approx((0.95575 + 0.985 + 1.0) / 3)
    assert metrics["critic/advantages/mean"] == pytest.approx((0.45575 + 0.585 + 0.3) / 3)
    assert ep.token_advantages is None, "the estimator returns copies"
    with pytest.raises(ValueError, match="2 critic values for 3 response tokens"):
        estimate_gae([ep], [[0.1, 0.2]], 1.0, 0.95)


def test_gae_through_the_estimate_stage():
    ep = make_episode(segments=[Segment(start=0, end=3)])
    seen = []

    def critic_values(episodes):
        seen.append([e.id for e in episodes])
        return [VALUES for _ in episodes]

    (out,), _ = estimate_advantages([ep], Gae(lam=1.0), critic_values=critic_values)
    assert seen == [["e0"]]
    assert out.token_advantages == pytest.approx([0.5, 0.6, 0.3]) and out.value_targets == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="needs the critic"):
        estimate_advantages([ep], Gae())
