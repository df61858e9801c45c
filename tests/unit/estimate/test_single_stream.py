"""Single-stream SPO math, checked against the worked examples of docs/algorithms.md#single-stream-worked-examples."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from spo_cli.episode import Episode, Segment
from spo_cli.estimate.single_stream.advantages import (
    belief_update,
    belief_value,
    estimate_single_stream,
    forgetting_factor,
    initial_belief,
    policy_distance,
    sampling_weights,
    single_stream_advantages,
    weighted_sample_without_replacement,
)

N0_RHO_MIN = 0.875  # N0 = 1 / (1 - 0.875) = 8


@pytest.mark.parametrize(
    ("successes", "jeffreys", "mean"),
    [
        (0, (0.444444, 7.555556), (0.0, 8.0)),
        (3, (3.111111, 4.888889), (3.0, 5.0)),
        (8, (7.555556, 0.444444), (8.0, 0.0)),
    ],
)
def test_initial_belief_table_12_1(successes, jeffreys, mean):
    scores = [1.0] * successes + [0.0] * (8 - successes)
    assert initial_belief(scores, 8, N0_RHO_MIN, "jeffreys") == pytest.approx(jeffreys, abs=1e-6)
    assert initial_belief(scores, 8, N0_RHO_MIN, "mean") == pytest.approx(mean, abs=1e-12)


def test_initial_belief_offline_n_zero_is_jeffreys_prior():
    assert initial_belief([], 0, N0_RHO_MIN) == (0.5, 0.5)


def test_initial_belief_binarises_and_uses_the_actual_count():
    # Scores > 0 are successes (the Nov recipe); 0.5 and 1 count, 0 and -1 do not: s = 2 of n = 4,
    # jeffreys v0 = 2.5 / 5 = 0.5 (the reference would divide by n0 + 1 = 9 and get 0.277778).
    assert initial_belief([0.5, 1.0, 0.0, -1.0], 8, N0_RHO_MIN) == pytest.approx((4.0, 4.0))
    # The Sep recipe's threshold 0.5: only 1.0 counts, v0 = 1.5 / 5 = 0.3.
    assert initial_belief([0.5, 1.0, 0.0, -1.0], 8, N0_RHO_MIN, binarize_above=0.5) == pytest.approx((2.4, 5.6))


@pytest.mark.parametrize(
    ("distance", "rho"),
    [(0.0, 0.96), (0.003, 0.96), (0.006, 0.933033), (0.010, 0.890899), (0.03, 0.875)],
)
def test_forgetting_factor_table_12_2(distance, rho):
    assert forgetting_factor(distance, 0.06, 0.875, 0.96) == pytest.approx(rho, abs=1e-6)


def test_forgetting_factor_bounds():
    # The clamps meet 2^(-D/0.06) at D = 0.06 log2(1/0.96) = 0.0035336 and 0.06 log2(1/0.875) = 0.0115587.
    upper, lower = 0.06 * math.log2(1 / 0.96), 0.06 * math.log2(1 / 0.875)
    assert upper == pytest.approx(0.0035336, abs=1e-7) and lower == pytest.approx(0.0115587, abs=1e-7)
    assert forgetting_factor(upper / 2, 0.06, 0.875, 0.96) == 0.96
    assert forgetting_factor(lower * 10, 0.06, 0.875, 0.96) == 0.875
    assert 0.875 < forgetting_factor((upper + lower) / 2, 0.06, 0.875, 0.96) < 0.96
    assert forgetting_factor(1e9, 0.06, 0.875, 0.96) == 0.875
    with pytest.raises(ValueError, match=">= 0"):
        forgetting_factor(-0.1, 0.06, 0.875, 0.96)


@pytest.mark.parametrize(
    ("reward", "rho", "alpha", "beta", "value"),
    [
        (1, 0.875, 3.625, 4.375, 0.453125),
        (0, 0.96, 2.88, 5.80, 0.331797),
        (1, 0.933033, 3.799099, 4.665165, 0.448840),
    ],
)
def test_belief_update_table_12_3(reward, rho, alpha, beta, value):
    new_alpha, new_beta = belief_update(3.0, 5.0, reward, rho)
    assert (new_alpha, new_beta) == pytest.approx((alpha, beta), abs=1e-6)
    assert belief_value(new_alpha, new_beta) == pytest.approx(value, abs=1e-6)
    # The EMA form: v = v_prev + eta (r - v_prev) with eta = 1 / (rho N + 1), N = alpha + beta = 8.
    eta = 1 / (rho * 8 + 1)
    assert belief_value(new_alpha, new_beta) == pytest.approx(0.375 + eta * (reward - 0.375), abs=1e-12)


def test_advantages_table_12_4():
    rewards, values = [1, 0, 1, 0], [0.375, 0.375, 0.9, 0.1]
    assert single_stream_advantages(rewards, values, norm="none") == pytest.approx([0.625, -0.375, 0.1, -0.1])
    out = single_stream_advantages(rewards, values)
    assert out == pytest.approx([1.331229, -1.035400, 0.088749, -0.384577], abs=1e-6)


def test_token_normalisation_weights_by_length():
    # A = [1, -1] with lengths [3, 1]: 4 token copies 1, 1, 1, -1; mean 0.5, Bessel std sqrt(3 / 3) = 1.
    out = single_stream_advantages([1, 0], [0, 1], lengths=[3, 1], norm="token", eps=0.0)
    assert out == pytest.approx([0.5, -1.5])


def test_single_sample_batch_is_centred_not_divided():
    assert single_stream_advantages([1], [0.25]) == [0.0]


def test_sampling_weights_table_12_5():
    values = [1 / 18, 7 / 18, 0.5, 17 / 18, 0.0, 0.375]  # (s + 0.5) / 9 for s = 0, 3, 8
    weights = sampling_weights(values, 0.05)
    assert weights == pytest.approx([0.279061, 0.537498, 0.55, 0.279061, 0.05, 0.534123], abs=1e-6)
    first_four = weights[:4]
    assert sum(first_four) == pytest.approx(1.645621, abs=1e-6)
    assert [w / sum(first_four) for w in first_four] == pytest.approx([0.169578, 0.326623, 0.334220, 0.169578], abs=1e-6)


def test_prompts_without_a_value_get_weight_zero_and_are_never_drawn():
    weights = sampling_weights([None, 0.5, None, 0.2])
    assert weights[0] == weights[2] == 0.0
    rng = random.Random(0)
    for _ in range(200):
        assert set(weighted_sample_without_replacement(weights, 2, rng)) == {1, 3}
    with pytest.raises(ValueError, match="only 2 have a positive"):
        weighted_sample_without_replacement(weights, 3, rng)


def test_weighted_sampling_matches_sequential_draws():
    # First draw of weights [1, 2, 3, 4]: P(i) = w_i / 10. Second draw given the first is i: w_j / (10 - w_i).
    # So P(first two = (3, 2)) = 0.4 * 3/6 = 0.2 and P(index 0 drawn at all in 2 draws) =
    # 0.1 + sum_{i != 0} w_i/10 * 1/(10 - w_i) = 0.1 + 0.2/8 + 0.3/7 + 0.4/6 = 0.234524.
    rng = random.Random(1)
    trials = 40_000
    draws = [tuple(weighted_sample_without_replacement([1, 2, 3, 4], 2, rng)) for _ in range(trials)]
    assert all(len(set(d)) == 2 for d in draws)
    pairs = Counter(draws)
    assert pairs[(3, 2)] / trials == pytest.approx(0.2, abs=0.01)
    assert sum(1 for d in draws if 0 in d) / trials == pytest.approx(0.234524, abs=0.01)


def test_policy_distance_estimators():
    then, now = [-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5]  # d = [0.5, -1.0, 0.0]
    assert policy_distance(then, now) == pytest.approx(0.5)
    assert policy_distance(then, now, "k1") == pytest.approx(0.0)  # mean d = -1/6 < 0 -> 0
    k3 = ((math.exp(-0.5) + 0.5 - 1) + (math.exp(1.0) - 1.0 - 1) + 0.0) / 3
    assert policy_distance(then, now, "k3") == pytest.approx(k3)
    assert policy_distance([], []) == 0.0


def _episode(i: int, reward: float, value: float | None, n_tokens: int = 2) -> Episode:
    metadata = {} if value is None else {"single_stream": {"key": f"q{i}", "value": value}}
    return Episode(
        id=f"e{i}",
        group_id=f"g{i}",
        prompt="p",
        response="r",
        prompt_token_ids=[1],
        response_token_ids=list(range(n_tokens)),
        finish_reason="stop",
        reward=reward,
        segments=[Segment(start=0, end=n_tokens)],
        metadata=metadata,
    )


def test_estimate_stage_broadcasts_the_batch_normalised_advantage():
    episodes = [_episode(i, r, v) for i, (r, v) in enumerate(zip([1, 0, 1, 0], [0.375, 0.375, 0.9, 0.1]))]
    out, metrics = estimate_single_stream(episodes)
    assert [ep.segments[0].advantage for ep in out] == pytest.approx([1.331229, -1.035400, 0.088749, -0.384577], abs=1e-6)
    assert metrics["single_stream/adv_before_norm"] == pytest.approx(0.0625)
    # The no-baseline ablation: A = r, normalised.
    out, _ = estimate_single_stream(episodes, use_baseline=False)
    assert [ep.segments[0].advantage for ep in out] == pytest.approx([0.866025, -0.866025, 0.866025, -0.866025], abs=1e-6)


def test_estimate_stage_needs_the_recorded_baseline():
    with pytest.raises(ValueError, match="no single-stream baseline"):
        estimate_single_stream([_episode(0, 1.0, None)])
