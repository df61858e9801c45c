"""GRPO and RLOO group advantages, checked against values worked out by hand."""

import math
import re

import pytest

from spo_cli.estimate import group_advantages, rloo_advantages

EPS = 1e-8


def test_one_group_population_std():
    # mean 0.5; population std sqrt(mean((+-0.5)^2)) = 0.5 (the sample std would be 0.577).
    adv = group_advantages([1.0, 0.0, 1.0, 0.0], ["q"] * 4)
    scale = 0.5 / (0.5 + EPS)
    assert adv == pytest.approx([scale, -scale, scale, -scale], abs=1e-12)


def test_three_members_uneven():
    # [0, 0, 3]: mean 1, population var (1 + 1 + 4) / 3 = 2.
    adv = group_advantages([0.0, 0.0, 3.0], [7, 7, 7], eps=0.0)
    s = math.sqrt(2.0)
    assert adv == pytest.approx([-1 / s, -1 / s, 2 / s], abs=1e-12)


def test_without_std_scaling():
    adv = group_advantages([1.0, 0.0, 1.0, 0.0], ["q"] * 4, scale_by_std=False)
    assert adv == pytest.approx([0.5, -0.5, 0.5, -0.5], abs=1e-12)


def test_interleaved_groups():
    # group a: [1, 0] -> mean 0.5, std 0.5; group b: [2, 4] -> mean 3, std 1.
    adv = group_advantages([1.0, 2.0, 0.0, 4.0], ["a", "b", "a", "b"])
    expected = [0.5 / (0.5 + EPS), -1 / (1 + EPS), -0.5 / (0.5 + EPS), 1 / (1 + EPS)]
    assert adv == pytest.approx(expected, abs=1e-12)


def test_all_equal_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point; the residue must not be blown up by eps.
    adv = group_advantages([0.1, 0.1, 0.1, 1.0, 0.0], [0, 0, 0, 1, 1])
    assert adv[:3] == [0.0, 0.0, 0.0]
    assert adv[3:] == pytest.approx([1.0, -1.0], abs=1e-7)


def test_singleton_group_is_zero():
    assert group_advantages([5.0, 1.0, 0.0], ["solo", "g", "g"])[0] == 0.0
    assert group_advantages([3.0], ["solo"], scale_by_std=False) == [0.0]


def test_empty_input():
    assert group_advantages([], []) == []


def test_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        group_advantages([1.0, 0.0], ["a"])


# ------------------------------------------------------------------------------------------------ rloo


def test_rloo_one_of_four_correct():
    # r = [1, 0, 0, 0]: the correct one's others average 0 -> A = 1; each wrong one's others average 1/3.
    assert rloo_advantages([1.0, 0.0, 0.0, 0.0], ["q"] * 4) == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_rloo_is_n_over_n_minus_1_times_the_centred_reward():
    # r = [1, 1, 0]: mean 2/3; A_0 = 1 - (1 + 0)/2 = 0.5 = 3/2 * (1 - 2/3); A_2 = 0 - 1 = -1 = 3/2 * (0 - 2/3).
    assert rloo_advantages([1.0, 1.0, 0.0], ["q"] * 3) == pytest.approx([0.5, 0.5, -1.0])


def test_rloo_groups_interleaved_and_unscaled():
    # Group a: [2, 0] -> [2, -2]; group b: [0.5, 0.5, 0.2] -> [0.5 - 0.35, 0.15, 0.2 - 0.5].
    adv = rloo_advantages([2.0, 0.5, 0.0, 0.5, 0.2], ["a", "b", "a", "b", "b"])
    assert adv == pytest.approx([2.0, 0.15, -2.0, 0.15, -0.3])


def test_rloo_equal_and_single_member_groups_are_exactly_zero():
    assert rloo_advantages([0.3, 0.3, 0.3, 1.0], ["a", "a", "a", "b"]) == [0.0, 0.0, 0.0, 0.0]


def test_rloo_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        rloo_advantages([1.0], ["a", "b"])


def test_huge_rewards_are_scaled_before_the_std():
    # (r - mean) ** 2 of rewards near 1e308 overflowed; the advantages are those of the rewards scaled down (eps is
    # negligible next to a std of 1e308, so compare without it).
    expected = group_advantages([1.0, -1.0, 0.0, 1.7], ["g"] * 4, eps=0.0)
    assert group_advantages([1e308, -1e308, 0.0, 1.7e308], ["g"] * 4) == pytest.approx(expected, rel=1e-12)
    assert group_advantages([1e308, 1.5e308], ["g"] * 2, scale_by_std=False) == [-0.25e308, 0.25e308]
    assert rloo_advantages([1e308, 1.5e308, 0.5e308], ["g"] * 3) == pytest.approx(
        [0.0, 0.75e308, -0.75e308], rel=1e-12, abs=1e296
    )
    tiny = group_advantages([5e-324, 1e-323, 0.0], ["g"] * 3, eps=0.0)  # subnormal rewards, no eps: scaled up
    assert tiny == pytest.approx(group_advantages([1.0, 2.0, 0.0], ["g"] * 3, eps=0.0), rel=1e-12)


def test_advantages_beyond_the_largest_float_are_a_value_error():
    message = "group g: rewards span more than the largest float ({})"
    with pytest.raises(ValueError, match=re.escape(message.format("1e+308 - -1e+308"))):
        rloo_advantages([1e308, -1e308], ["g", "g"])  # 1e308 - (-1e308)
    with pytest.raises(ValueError, match=re.escape(message.format("1.7e+308 - -1.7e+308"))):
        group_advantages([1.7e308, -1.7e308, -1.7e308, -1.7e308], ["g"] * 4, scale_by_std=False)  # 1.7e308 + 0.85e308
