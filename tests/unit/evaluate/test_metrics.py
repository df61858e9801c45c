"""Evaluation math, with values worked out by hand."""

from __future__ import annotations

import pytest

from spo_cli.evaluate.metrics import (
    context_label,
    majority_correct,
    parse_context,
    parse_contexts,
    pass_at_k,
    sampling_standard_error,
    summarize,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("2k", 2048), ("4K", 4096), ("32k", 32768), ("4096", 4096), (" 512 ", 512), ("1.5k", 1536), ("0.5K", 512)],
)
def test_parse_context(text, tokens):
    assert parse_context(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "2m", "-1", "0", "1.3", "0.0001k", "2 k k", "two"])
def test_parse_context_rejects(text):
    with pytest.raises(ValueError):
        parse_context(text)


def test_parse_contexts_keeps_order_and_drops_repeats():
    assert parse_contexts("4k,2k,2048,32k") == [4096, 2048, 32768]
    with pytest.raises(ValueError):
        parse_contexts(" , ")


def test_context_label():
    assert [context_label(t) for t in (2048, 32768, 256, 1536)] == ["2k", "32k", "256", "1536"]


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than draws: a draw of 2 always holds a correct one
    assert pass_at_k(8, 2, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_correct():
    assert majority_correct(["5", "7", "5", None], [True, False, True, False]) is True
    assert majority_correct(["7", "7", "5", "5", "5"], [False, False, True, True, True]) is True
    assert majority_correct(["7", "5"], [False, True]) is False  # a tie goes to the answer seen first
    assert majority_correct([None, "5", None, None], [False, True, False, False]) is True  # silence does not vote
    assert majority_correct([None, None], [False, False]) is False


def test_summarize_by_hand():
    # Problem 1: 3 of 4 correct, votes 18, 18, 17, 18 -> maj right. Problem 2: 1 of 4, votes 3, 4, 4, None -> maj wrong.
    correct = [[True, True, False, True], [True, False, False, False]]
    answers = [["18", "18", "17", "18"], ["3", "4", "4", None]]
    out = summarize(correct, answers)
    assert out["accuracy"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert out["avg@4"] == out["accuracy"]
    # pass@2: problem 1: 1 - C(1,2)/C(4,2) = 1; problem 2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert out["pass@2"] == pytest.approx((1 + 0.5) / 2)
    assert out["pass@4"] == 1.0
    assert out["maj@4"] == 0.5
    # SE with the problems fixed: sqrt((0.75 * 0.25 + 0.25 * 0.75) / (4 - 1)) / 2 = sqrt(0.125) / 2
    assert out["accuracy_se"] == pytest.approx(0.125**0.5 / 2)
    assert set(out) == {"accuracy", "accuracy_se", "avg@4", "pass@2", "pass@4", "maj@4"}


def test_summarize_one_sample_is_plain_accuracy():
    assert summarize([[True], [False], [False]], [["1"], ["2"], [None]]) == {"accuracy": pytest.approx(1 / 3)}
    with pytest.raises(ValueError):
        summarize([[True], [True, False]], [["1"], ["1", "2"]])


def test_sampling_standard_error_by_hand():
    # Two problems x 4 samples, 2 and 4 right: p^ = 0.5 and 1, sum p^(1 - p^) = 0.25;
    # SE = sqrt(0.25 / 3) / 2 = 0.144338.
    assert sampling_standard_error([2, 4], 4) == pytest.approx(0.1443376, rel=1e-6)
    # One problem, 1 of 2 right: sqrt(0.25 / 1) / 1 = 0.5. (Unbiased for the variance: at p = 0.5 the outcomes
    # 0, 1, 2 right have chances 1/4, 1/2, 1/4 and estimates 0, 0.25, 0, expectation 0.125 = 0.25 / 2.)
    assert sampling_standard_error([1], 2) == pytest.approx(0.5)
    # A policy that always or never answers right has nothing to resample.
    assert sampling_standard_error([0, 4, 4], 4) == 0.0
    # More samples per problem shrink it as 1/sqrt(k - 1) at equal p^: 8 samples, 4 right -> sqrt(0.25 / 7).
    assert sampling_standard_error([4], 8) == pytest.approx((0.25 / 7) ** 0.5)


def test_sampling_standard_error_needs_two_samples_and_valid_counts():
    with pytest.raises(ValueError, match=">= 2 samples"):
        sampling_standard_error([1], 1)
    with pytest.raises(ValueError, match=">= 2 samples"):
        sampling_standard_error([], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        sampling_standard_error([5], 4)
