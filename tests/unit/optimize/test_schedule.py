import math

import pytest

from spo_cli.optimize.schedule import lr_multiplier


def m(step, kind, total=10, warmup=2, min_ratio=0.0):
    return lr_multiplier(step, total_steps=total, warmup_steps=warmup, kind=kind, min_ratio=min_ratio)


def test_warmup_is_linear_from_the_first_step():
    assert [m(s, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_linear_decay_reaches_zero_at_total():
    # after 2 warmup steps, 8 steps of decay: step 6 is halfway
    assert m(2, "linear") == 1.0
    assert m(6, "linear") == pytest.approx(0.5)
    assert m(10, "linear") == 0.0 and m(50, "linear") == 0.0


def test_cosine_with_floor():
    assert m(6, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert m(10, "cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_no_warmup():
    assert m(0, "linear", warmup=0) == 1.0


def test_warmup_decay_is_deepspeeds_warmup_decay_lr():
    """W = 4, T = 10. DeepSpeed starts at the minimum rate and steps after each update, so update s runs at
    position i = s - 1: log(i + 1) / log 4 while i < 4 (0, 0, 1/2, log 3 / log 4, then 1 at s = 4), then
    (10 - i) / (10 - 4): 1 at s = 5, 5/6 at s = 6, ..., 0 from s = 11."""
    got = [m(s, "warmup_decay", total=10, warmup=4) for s in range(13)]
    expected = [0.0, 0.0, 0.5, math.log(3) / math.log(4), 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0]
    assert got == pytest.approx(expected, abs=1e-12)
    # Under two warmup steps DeepSpeed has no log warmup (it divides by log W): the decay starts at once.
    assert [m(s, "warmup_decay", total=4, warmup=1) for s in range(4)] == pytest.approx([0.0, 1.0, 1.0, 2 / 3])
