"""The critic's clipped value loss, checked against the worked example of
docs/algorithms.md#segment-gae-worked-example."""

from __future__ import annotations

import math

import pytest
import torch

from spo_cli.estimate.critic.loss import clipped_value_loss

OLD = [[0.5, 0.4, 0.7]]
RETURNS = [[0.95575, 0.985, 1.0]]  # the lam 0.95 GAE returns of the same example


def loss_of(values, old=OLD, returns=RETURNS, mask=None, clip=0.2, **kw):
    v = torch.tensor(values, requires_grad=True)
    m = torch.ones_like(v) if mask is None else torch.tensor(mask)
    loss, metrics = clipped_value_loss(v, torch.tensor(old), torch.tensor(returns), m, clip, **kw)
    return v, loss, metrics


def test_first_epoch_values_equal_old_values():
    # squared errors [0.207708, 0.342225, 0.09]; half their mean
    _, loss, metrics = loss_of(OLD)
    assert loss.item() == pytest.approx(0.106656, abs=1e-6)
    assert 0.1 * loss.item() == pytest.approx(0.010666, abs=1e-6)  # times vf_coef
    assert metrics["value_clipfrac"] == 0.0 and metrics["num_value_tokens"] == 3


def test_later_epoch_clips_values_that_ran_past_the_range():
    # V_new [0.8, 0.9, 0.75] clips to [0.7, 0.6, 0.75]; per token max = [0.065408, 0.148225, 0.0625].
    v, loss, metrics = loss_of([[0.8, 0.9, 0.75]])
    assert loss.item() == pytest.approx(0.046022, abs=1e-6)
    # the clipped term is the larger at the first two tokens (at the third they are equal)
    assert metrics["value_clipfrac"] == pytest.approx(2 / 3)
    assert metrics["value_loss"] == pytest.approx(loss.item())
    loss.backward()
    # Clipped tokens get no gradient; the third gets d/dV 0.5 * (V - G)^2 / 3 = (0.75 - 1.0) / 3.
    assert v.grad[0].tolist() == pytest.approx([0.0, 0.0, -0.25 / 3], abs=1e-7)


def test_mask_and_padding_do_not_leak():
    values = [[0.5, 0.4, 0.7, float("nan")]]
    v, loss, metrics = loss_of(values, old=[OLD[0] + [0.0]], returns=[RETURNS[0] + [5.0]], mask=[[1.0, 1.0, 1.0, 0.0]])
    assert loss.item() == pytest.approx(0.106656, abs=1e-6) and metrics["num_value_tokens"] == 3
    loss.backward()
    assert math.isfinite(v.grad.sum().item()) and v.grad[0, 3].item() == 0.0


def test_accumulation_normalizer_adds_up_to_the_whole():
    _, whole, _ = loss_of(OLD)
    _, first, _ = loss_of([[0.5, 0.4]], old=[[0.5, 0.4]], returns=[[0.95575, 0.985]], normalizer=3.0)
    _, second, _ = loss_of([[0.7]], old=[[0.7]], returns=[[1.0]], normalizer=3.0)
    assert (first + second).item() == pytest.approx(whole.item(), abs=1e-7)


def test_empty_mask_is_zero_and_backpropagates():
    v, loss, metrics = loss_of(OLD, mask=[[0.0, 0.0, 0.0]])
    loss.backward()
    assert loss.item() == 0.0 and metrics["value_clipfrac"] == 0.0 and v.grad.abs().sum().item() == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="returns has shape"):
        clipped_value_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 3), 0.2)
    with pytest.raises(ValueError, match="clip must be > 0"):
        clipped_value_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.0)
