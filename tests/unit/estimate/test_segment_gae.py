"""Value-network segment SPO (estimator.kind=segment_gae), checked against the worked example of
docs/algorithms.md#segment-gae-worked-example and small examples worked out by hand."""

from __future__ import annotations

import math

import pytest

from spo_cli.episode import Segment
from spo_cli.estimate import (
    estimate_advantages,
    needs_critic,
    segment_gae,
    segment_value_targets,
    spread_over_tokens,
    whiten_tokens,
)
from spo_cli.estimate.segment_gae import estimate_segment_gae, estimate_segment_gae_fallback
from spo_cli.recipe import SegmentGae

from ..test_episode import make_episode

# The worked example's sequence A (docs/algorithms.md#segment-gae-worked-example; 8 tokens, percentile 0.2, batch
# scope): segments [0, 1), [1, 4), [4, 8).
BOUNDS_A = [(0, 1), (1, 4), (4, 8)]
SEGMENT_VALUES_A = [0.5, 0.4, 0.7]
# The critic's value before every token; only those at segment starts (0, 1, 4) may matter.
TOKEN_VALUES_A = [0.5, 0.4, 0.45, 0.5, 0.7, 0.8, 0.9, 0.95]
TOKEN_ADVANTAGES_A = [0.45575, 0.585, 0.585, 0.585, 0.3, 0.3, 0.3, 0.3]


def episode_a(**kw):
    segments = [Segment(start=s, end=e) for s, e in BOUNDS_A]
    base = dict(response_token_ids=list(range(8)), response_logprobs=[-0.5] * 8, reward=1.0, segments=segments)
    return make_episode(**{**base, **kw})


def test_spec_example_a_lambda_095():
    # delta = [0.4 - 0.5, 0.7 - 0.4, 1 - 0.7] = [-0.1, 0.3, 0.3]
    # A2 = 0.3; A1 = 0.3 + 0.95 * 0.3 = 0.585; A0 = -0.1 + 0.95 * 0.585 = 0.45575
    advantages, returns = segment_gae(SEGMENT_VALUES_A, 1.0, gamma=1.0, lam=0.95)
    assert advantages == pytest.approx([0.45575, 0.585, 0.3], abs=1e-12)
    assert returns == pytest.approx([0.95575, 0.985, 1.0], abs=1e-12)
    assert spread_over_tokens(advantages, BOUNDS_A) == pytest.approx(TOKEN_ADVANTAGES_A, abs=1e-12)


def test_spec_example_a_lambda_one_gives_monte_carlo_returns():
    advantages, returns = segment_gae(SEGMENT_VALUES_A, 1.0, gamma=1.0, lam=1.0)
    assert advantages == pytest.approx([0.5, 0.6, 0.3], abs=1e-12)
    assert returns == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_two_segments_by_hand():
    # The worked example's sequence B split as [0, 3), [3, 6), with V = [0.6, 0.3] at the starts, a wrong answer
    # (r = 0) and lam 0.5:
    # delta1 = 0 + 0 - 0.3 = -0.3, A1 = -0.3; delta0 = 0 + 0.3 - 0.6 = -0.3, A0 = -0.3 + 0.5 * -0.3 = -0.45;
    # G = A + V = [0.15, 0.0].
    advantages, returns = segment_gae([0.6, 0.3], 0.0, gamma=1.0, lam=0.5)
    assert advantages == pytest.approx([-0.45, -0.3], abs=1e-12)
    assert returns == pytest.approx([0.15, 0.0], abs=1e-12)
    # The discount is per segment (D4): with r = 1, gamma 0.5, lam 1: delta1 = 1 - 0.3 = 0.7, A1 = 0.7;
    # delta0 = 0.5 * 0.3 - 0.6 = -0.45, A0 = -0.45 + 0.5 * 0.7 = -0.1; G0 = 0.5 = gamma^1 * r (one segment
    # before the end, although three tokens are).
    advantages, returns = segment_gae([0.6, 0.3], 1.0, gamma=0.5, lam=1.0)
    assert advantages == pytest.approx([-0.1, 0.7], abs=1e-12)
    assert returns == pytest.approx([0.5, 1.0], abs=1e-12)
    assert spread_over_tokens(advantages, [(0, 3), (3, 6)]) == pytest.approx([-0.1] * 3 + [0.7] * 3)


def test_no_segments():
    assert segment_gae([], 1.0, 1.0, 0.95) == ([], [])
    assert spread_over_tokens([], []) == [] and segment_value_targets([], [], "segment_starts") == []


def test_value_targets_at_segment_starts_or_all_tokens():
    returns = [0.95575, 0.985, 1.0]
    assert segment_value_targets(returns, BOUNDS_A, "segment_starts") == [
        0.95575, 0.985, None, None, 1.0, None, None, None,
    ]  # fmt: skip
    assert segment_value_targets(returns, BOUNDS_A, "all_tokens") == [0.95575] + [0.985] * 3 + [1.0] * 4


def test_whitening_of_the_spec_example():
    # mean 0.426344, population variance 0.017529 (docs/algorithms.md#segment-gae-worked-example)
    (whitened,) = whiten_tokens([TOKEN_ADVANTAGES_A])
    expected = [0.222107] + [1.198339] * 3 + [-0.954281] * 4
    assert whitened == pytest.approx(expected, abs=1e-6)


def test_whitening_pools_all_tokens_of_all_episodes():
    # [0.5] * 3 and [-0.5]: token mean 0.25, population variance (3 * 0.25^2 + 0.75^2) / 4 = 0.1875, so
    # 0.25 / sqrt(0.1875) = 1 / sqrt(3) and -0.75 / sqrt(0.1875) = -sqrt(3); a long episode weighs more.
    long, short = whiten_tokens([[0.5] * 3, [-0.5]], eps=0.0)
    assert long == pytest.approx([1 / math.sqrt(3)] * 3) and short == pytest.approx([-math.sqrt(3)])
    assert whiten_tokens([[], []]) == [[], []]


@pytest.mark.parametrize("positions", ["segment_starts", "all_tokens"])
def test_estimate_segment_gae_on_episode_a(positions):
    empty = make_episode(id="e1", response_token_ids=[], response_logprobs=[], reward=0.0, segments=[])
    ep = episode_a()
    (out, out_empty), metrics = estimate_segment_gae(
        [ep, empty], [TOKEN_VALUES_A, []], 1.0, 0.95, positions, normalize_advantages=False
    )
    assert out.token_advantages == pytest.approx(TOKEN_ADVANTAGES_A, abs=1e-12)
    assert out.response_values == TOKEN_VALUES_A
    assert [s.value for s in out.segments] == SEGMENT_VALUES_A
    assert [s.advantage for s in out.segments] == pytest.approx([0.45575, 0.585, 0.3], abs=1e-12)
    expected_targets = segment_value_targets([0.95575, 0.985, 1.0], BOUNDS_A, positions)
    assert out.value_targets == pytest.approx(expected_targets, abs=1e-12)
    assert out_empty.token_advantages == [] and out_empty.value_targets == [] and out_empty.segments == []
    # The critic's metrics are taken where it is trained: the three starts, or every token.
    trained = [(v, g) for v, g in zip(TOKEN_VALUES_A, expected_targets) if g is not None]
    assert metrics["critic/values/mean"] == pytest.approx(sum(v for v, _ in trained) / len(trained))
    assert metrics["critic/returns/mean"] == pytest.approx(sum(g for _, g in trained) / len(trained))
    assert metrics["critic/advantages/mean"] == pytest.approx(sum(TOKEN_ADVANTAGES_A) / 8)
    assert math.isfinite(metrics["critic/vf_explained_var"])
    assert metrics["segment_gae/segments"] == 1.5 and metrics["segment_gae/fallback"] == 0.0
    assert ep.token_advantages is None, "the estimator returns copies"


def test_estimate_segment_gae_reads_values_only_at_segment_starts_and_whitens():
    other_values = [0.5, 0.4, -3.0, 7.0, 0.7, 0.0, 0.0, 0.0]
    (out,), _ = estimate_segment_gae([episode_a()], [other_values], 1.0, 0.95)
    expected = [0.222107] + [1.198339] * 3 + [-0.954281] * 4
    assert out.token_advantages == pytest.approx(expected, abs=1e-6)
    # a segment's advantage is its tokens' final (whitened) advantage
    assert [s.advantage for s in out.segments] == pytest.approx([0.222107, 1.198339, -0.954281], abs=1e-6)
    with pytest.raises(ValueError, match="2 critic values for 8 response tokens"):
        estimate_segment_gae([episode_a()], [[0.1, 0.2]], 1.0, 0.95)


def test_segment_gae_through_the_estimate_stage():
    seen = []

    def critic_values(episodes):
        seen.append([e.id for e in episodes])
        return [TOKEN_VALUES_A for _ in episodes]

    spec = SegmentGae(lam=1.0, normalize_advantages=False)
    assert needs_critic(spec) and not needs_critic(SegmentGae(critic=None))
    (out,), metrics = estimate_advantages([episode_a()], spec, critic_values=critic_values)
    assert seen == [["e0"]]
    assert out.token_advantages == pytest.approx([0.5, 0.6, 0.6, 0.6, 0.3, 0.3, 0.3, 0.3])
    assert out.value_targets == pytest.approx([1.0, 1.0, None, None, 1.0, None, None, None])
    with pytest.raises(ValueError, match="needs the critic"):
        estimate_advantages([episode_a()], spec)


def fallback_group():
    """Four responses to one prompt with rewards [1, 0, 0, 1], of different lengths and segmentations."""
    episodes = []
    for i, (reward, bounds) in enumerate(zip([1.0, 0.0, 0.0, 1.0], [[(0, 2)], [(0, 1), (1, 3)], BOUNDS_A, [(0, 4)]])):
        n = bounds[-1][1]
        episodes.append(
            make_episode(
                id=f"e{i}",
                response_token_ids=list(range(n)),
                response_logprobs=[-0.5] * n,
                reward=reward,
                segments=[Segment(start=s, end=e) for s, e in bounds],
            )
        )
    return episodes


def test_fallback_gives_every_token_r_minus_the_group_mean():
    # b = 0.5: every token gets +-0.5; with the group's population std 0.5 (eps ~ 0): +-1.0.
    signs = [1.0, -1.0, -1.0, 1.0]
    out, metrics = estimate_segment_gae_fallback(fallback_group(), normalize_advantages=False)
    for ep, sign in zip(out, signs):
        assert ep.token_advantages == pytest.approx([0.5 * sign] * len(ep.response_token_ids), abs=1e-12)
        assert [s.advantage for s in ep.segments] == pytest.approx([0.5 * sign] * len(ep.segments), abs=1e-12)
        assert ep.response_values is None and ep.value_targets is None
    assert metrics["segment_gae/fallback"] == 1.0
    out, _ = estimate_segment_gae_fallback(fallback_group(), scale_by_std=True, normalize_advantages=False, eps=1e-12)
    for ep, sign in zip(out, signs):
        assert ep.token_advantages == pytest.approx([1.0 * sign] * len(ep.response_token_ids), abs=1e-9)


def test_fallback_ignores_lambda_and_gamma():
    base, _ = estimate_advantages(fallback_group(), SegmentGae(critic=None, lam=1.0, normalize_advantages=False))
    # with V_k = b and lam 0.3 a critic-style GAE would give A_k = 0.3^(K-1-k) (r - b): early segments shrink
    shrunk, metrics = estimate_advantages(
        fallback_group(), SegmentGae(critic=None, lam=0.3, gamma=0.5, normalize_advantages=False)
    )
    assert [ep.token_advantages for ep in shrunk] == [ep.token_advantages for ep in base]
    assert shrunk[2].token_advantages == pytest.approx([-0.5] * 8)  # three segments, all at r - b
    assert metrics["segment_gae/fallback"] == 1.0


def test_fallback_whitens_over_tokens():
    # Tokens: +0.5 on 2 + 4 = 6 of them, -0.5 on 3 + 8 = 11; with a fraction p = 6/17 positive, two values
    # 1 apart have population variance p (1 - p) and mean 0.5 (2p - 1), so +0.5 whitens to
    # (1 - p) / sqrt(p (1 - p)) = sqrt(11/6) and -0.5 to -sqrt(6/11): per token, not per episode.
    out, _ = estimate_segment_gae_fallback(fallback_group(), normalize_advantages=True, eps=0.0)
    for ep, expected in zip(out, [math.sqrt(11 / 6), -math.sqrt(6 / 11), -math.sqrt(6 / 11), math.sqrt(11 / 6)]):
        assert ep.token_advantages == pytest.approx([expected] * len(ep.response_token_ids), abs=1e-12)
