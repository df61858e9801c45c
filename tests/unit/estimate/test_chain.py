"""SPO-chain advantages, checked against values worked out by hand and against the reference loop."""

from __future__ import annotations

import math
import random

import pytest

from spo_cli.estimate.chain import chain_segment_advantages, chain_token_advantages
from spo_cli.partition.cutpoint import cutpoint_boundaries

# Values are multiples of 1/4 so every difference is exact in binary floating point.
LOW = math.log(0.5)  # p = 0.5: below rho = 0.9, keeps its advantage
HIGH = math.log(0.99)  # p = 0.99: above rho = 0.9, zeroed by the probability mask


def test_segment_advantages_value_after_minus_value_before():
    # V = [0.25, 0.75, 0.5], R = 1: [0.75 - 0.25, 0.5 - 0.75, 1 - 0.5].
    assert chain_segment_advantages([1, 3, 4], [0.25, 0.75, 0.5], 1.0) == [0.5, -0.25, 0.5]
    assert chain_segment_advantages([], [], 1.0) == []


def test_tokens_leading_region_is_zero_and_confident_tokens_are_masked():
    # K = [1, 3, 4] (interval 1). Token 0 is the leading region (0); segments [1,3) 0.5, [3,4) -0.25,
    # [4,6) 0.5. The mask then zeroes tokens 2 and 5 (p = 0.99 > 0.9).
    logprobs = [HIGH, LOW, HIGH, LOW, LOW, HIGH]
    boundaries = cutpoint_boundaries(logprobs, interval=1)
    assert boundaries == [1, 3, 4]
    adv = chain_token_advantages(logprobs, boundaries, [0.25, 0.75, 0.5], 1.0)
    assert adv == [0.0, 0.5, 0.0, -0.25, 0.5, 0.0]


def test_tokens_without_mask_rho_none():
    # Same episode, fixed-count-ablation style: no zeroing, the leading region is still 0.
    logprobs = [HIGH, LOW, HIGH, LOW, LOW, HIGH]
    adv = chain_token_advantages(logprobs, [1, 3, 4], [0.25, 0.75, 0.5], 1.0, rho=None)
    assert adv == [0.0, 0.5, 0.5, -0.25, 0.5, 0.5]


def test_tokens_boundary_at_zero_uses_the_prompt_value():
    # First token low -> boundary 0; V(prompt) = 0.25, V(before token 2) = 0.5, R = 0:
    # segments [0,2) 0.25 and [2,3) -0.5; token 1 (p = 0.99) is masked.
    logprobs = [LOW, HIGH, LOW]
    assert cutpoint_boundaries(logprobs, interval=1) == [0, 2]
    assert chain_token_advantages(logprobs, [0, 2], [0.25, 0.5], 0.0) == [0.25, 0.0, -0.5]


def test_tokens_no_boundaries_all_zero():
    assert chain_token_advantages([HIGH, HIGH, HIGH], [], [], 1.0) == [0.0, 0.0, 0.0]
    # Even unmasked, no boundary means no estimated state: zeros, not R.
    assert chain_token_advantages([LOW, LOW], [], [], 1.0, rho=None) == [0.0, 0.0]
    assert chain_token_advantages([], [], [], 1.0) == []


def test_tokens_single_token():
    # One low token at 0: R - V(prompt) = 1 - 0.25.
    assert chain_token_advantages([LOW], [0], [0.25], 1.0) == [0.75]
    assert chain_token_advantages([HIGH], [], [], 1.0) == [0.0]


def test_tokens_all_low_probability():
    # K = [0..4], interval 2 -> boundaries 0, 2, 4; V = [0.5, 0.25, 0.75], R = 1:
    # segments -0.25, 0.5, 0.25; nothing is masked.
    logprobs = [LOW] * 5
    boundaries = cutpoint_boundaries(logprobs, interval=2)
    assert boundaries == [0, 2, 4]
    adv = chain_token_advantages(logprobs, boundaries, [0.5, 0.25, 0.75], 1.0)
    assert adv == [-0.25, -0.25, 0.5, 0.5, 0.25]


def test_tokens_last_token_low():
    # Only token 3 is low: leading region 0..2 gets 0, the last segment R - V = 1 - 0.25.
    logprobs = [HIGH, HIGH, HIGH, LOW]
    assert cutpoint_boundaries(logprobs) == [3]
    assert chain_token_advantages(logprobs, [3], [0.25], 1.0) == [0.0, 0.0, 0.0, 0.75]


def test_tokens_probability_exactly_at_rho_is_not_masked():
    # exp(log(0.5)) is exactly 0.5, so "0.5 > 0.5" is false for certain: token 1 keeps its advantage;
    # token 2 (p = 0.75 > 0.5) is zeroed. Boundary 0 (p = 0.25 < 0.5), V = 0.25, R = 1 -> 0.75.
    assert math.exp(math.log(0.5)) == 0.5
    logprobs = [math.log(0.25), math.log(0.5), math.log(0.75)]
    assert cutpoint_boundaries(logprobs, rho=0.5) == [0]
    assert chain_token_advantages(logprobs, [0], [0.25], 1.0, rho=0.5) == [0.75, 0.75, 0.0]


def test_tokens_interval_larger_than_candidate_count():
    # K = [1, 3, 4]; interval 10 keeps only 1: one segment [1, 6) with 1 - 0.25, confident tokens masked.
    logprobs = [HIGH, LOW, HIGH, LOW, LOW, HIGH]
    boundaries = cutpoint_boundaries(logprobs, interval=10)
    assert boundaries == [1]
    assert chain_token_advantages(logprobs, boundaries, [0.25], 1.0) == [0.0, 0.75, 0.0, 0.75, 0.75, 0.0]


def test_tokens_interval_one_every_low_token_opens_a_segment():
    # K = [0, 1, 2]: segments of one token each; V = [0.5, 0.75, 0.25], R = 0 -> 0.25, -0.5, -0.25.
    logprobs = [LOW, LOW, LOW, HIGH]
    boundaries = cutpoint_boundaries(logprobs, interval=1)
    assert boundaries == [0, 1, 2]
    assert chain_token_advantages(logprobs, boundaries, [0.5, 0.75, 0.25], 0.0) == [0.25, -0.5, -0.25, 0.0]


@pytest.mark.parametrize(
    ("boundaries", "values", "match"),
    [
        ([1, 3], [0.5], "same length"),
        ([1], [0.5, 0.25], "same length"),
        ([3, 1], [0.5, 0.25], "strictly increasing"),
        ([1, 1], [0.5, 0.25], "strictly increasing"),
        ([-1], [0.5], "non-negative"),
        ([4], [0.5], r"\[0, 4\)"),
    ],
)
def test_tokens_reject_invalid_inputs(boundaries, values, match):
    with pytest.raises(ValueError, match=match):
        chain_token_advantages([LOW] * 4, boundaries, values, 1.0)


def test_tokens_reject_bad_rho():
    with pytest.raises(ValueError):
        chain_token_advantages([LOW], [0], [0.5], 1.0, rho=0.0)
    with pytest.raises(ValueError):
        chain_token_advantages([LOW], [0], [0.5], 1.0, rho=1.5)


def reference_token_advantages(logprobs, cutpoints, values, reward, rho=0.9):
    """The reference's `_compute_token_advantages`, transcribed loop by loop (cutpoints = boundaries - 1); its
    result is described in docs/algorithms.md#spo-chain."""
    length = len(logprobs)
    val = [None] * length
    val[length - 1] = reward
    if not cutpoints:
        return [0.0] * length
    adv = [None] * length
    base = None
    cutpoints, values = list(cutpoints), list(values)
    if cutpoints[0] == -1:
        base = values[0]
        cutpoints, values = cutpoints[1:], values[1:]
    for c, v in zip(cutpoints, values):
        val[c] = v
    for t in range(length):
        if val[t] is not None:
            adv[t] = 0.0 if base is None else val[t] - base
            base = val[t]
    for t in range(length - 1, -1, -1):
        if adv[t] is None:
            adv[t] = adv[t + 1]
    if rho is not None:
        adv = [0.0 if math.exp(lp) > rho else a for lp, a in zip(logprobs, adv)]
    return adv


def test_tokens_match_the_reference_loop_on_random_episodes():
    rng = random.Random(0)
    for _ in range(500):
        length = rng.randint(1, 30)
        logprobs = [math.log(rng.choice([0.3, 0.6, 0.89, 0.9, 0.95, 0.999])) for _ in range(length)]
        boundaries = cutpoint_boundaries(logprobs, interval=rng.randint(1, 4))
        values = [rng.random() for _ in boundaries]
        reward = rng.choice([0.0, 1.0, -2.0])
        rho = rng.choice([0.9, None])
        expected = reference_token_advantages(logprobs, [b - 1 for b in boundaries], values, reward, rho)
        assert chain_token_advantages(logprobs, boundaries, values, reward, rho) == expected
