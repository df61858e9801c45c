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
