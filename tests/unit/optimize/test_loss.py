"""PPO clip loss, KL, whitening and log-prob helpers, checked against hand-derived values.

Conventions: with old_logprobs = 0, logprobs = x gives log-ratio x, so x = 1 is ratio e and
x = -1 is ratio 1/e; with the default eps 0.2 the clip range is [0.8, 1.2].
"""

import math

import pytest
import torch

from spo_cli.optimize.loss import (
    LossInputs,
    masked_whiten,
    ppo_clip_loss,
    token_entropy,
    token_log_probs,
)

E = math.e


def make_inputs(log_ratio, adv, mask=None, old=None, ref=None):
    logprobs = torch.tensor(log_ratio, dtype=torch.float32)
    old_t = torch.zeros_like(logprobs) if old is None else torch.tensor(old, dtype=torch.float32)
    logprobs = (logprobs + old_t).requires_grad_(True)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=old_t,
        advantages=torch.tensor(adv, dtype=torch.float32),
        mask=torch.ones_like(old_t) if mask is None else torch.tensor(mask, dtype=torch.float32),
        ref_logprobs=None if ref is None else torch.tensor(ref, dtype=torch.float32),
    )


# ---------------------------------------------------------------- clipped surrogate, one token


@pytest.mark.parametrize(
    "log_ratio, adv, expected, low, high",
    [
        # ratio e > 1.2, A > 0: clipped, pg = -(1 + eps) * A
        (1.0, 1.0, -1.2, 0.0, 1.0),
        (1.0, 2.0, -2.4, 0.0, 1.0),
        # ratio 1/e < 0.8, A < 0: clipped, pg = -(1 - eps) * A
        (-1.0, -1.0, 0.8, 1.0, 0.0),
        (-1.0, -3.0, 2.4, 1.0, 0.0),
        # ratio e, A < 0: the pessimistic max keeps the unclipped branch, pg = -A * e
        (1.0, -1.0, E, 0.0, 0.0),
        # ratio 1/e, A > 0: unclipped as well, pg = -A / e
        (-1.0, 1.0, -1 / E, 0.0, 0.0),
        # inside [0.8, 1.2]: ratio e^0.1 = 1.10517
        (0.1, 2.0, -2.0 * math.exp(0.1), 0.0, 0.0),
        (-0.1, -2.0, 2.0 * math.exp(-0.1), 0.0, 0.0),
    ],
)
def test_single_token_clip_cases(log_ratio, adv, expected, low, high):
    out = ppo_clip_loss(make_inputs([[log_ratio]], [[adv]]))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.policy_loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["clip_ratio/low"] == low
    assert out.metrics["clip_ratio/high"] == high
    assert out.metrics["clip_ratio"] == low + high
    assert out.metrics["ratio_mean"] == pytest.approx(math.exp(log_ratio), rel=1e-6)


def test_asymmetric_clip_range():
    # clip-higher: ratio e, A = 1 -> -(1 + 0.28); ratio 1/e, A = -1 -> 1 - 0.1
    out = ppo_clip_loss(make_inputs([[1.0]], [[1.0]]), epsilon_low=0.1, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(-1.28, rel=1e-6)
    out = ppo_clip_loss(make_inputs([[-1.0]], [[-1.0]]), epsilon_low=0.1, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(0.9, rel=1e-6)


def test_dual_clip_caps_negative_advantage_tokens():
    # ratio e^3 = 20.09, A = -1: the pessimistic max gives 20.09; the dual clip caps it at -A * 10 = 10,
    # and the capped token has no gradient.
    inputs = make_inputs([[3.0, 3.0, 0.5]], [[-1.0, 1.0, -2.0]])
    out = ppo_clip_loss(inputs, epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=10.0)
    # token 2: A = 1, ratio 20.09 > 1.28 -> -1.28; token 3: ratio e^0.5 = 1.6487 < 10 -> unclipped 2 * 1.6487.
    expected = (10.0 - 1.28 + 2 * math.exp(0.5)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["clip_ratio/dual"] == pytest.approx(1 / 3)
    out.loss.backward()
    assert inputs.logprobs.grad[0, 0].item() == 0.0 and inputs.logprobs.grad[0, 1].item() == 0.0
    assert inputs.logprobs.grad[0, 2].item() == pytest.approx(2 * math.exp(0.5) / 3, rel=1e-6)
    # Without it the first token costs e^3.
    plain = ppo_clip_loss(make_inputs([[3.0, 3.0, 0.5]], [[-1.0, 1.0, -2.0]]), epsilon_high=0.28)
    assert plain.loss.item() == pytest.approx((math.exp(3.0) - 1.28 + 2 * math.exp(0.5)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(make_inputs([[0.0]], [[1.0]]), clip_ratio_c=1.0)


def test_mixed_batch_token_mean_and_clip_metrics():
    # tokens: high-clipped (-1.2), low-clipped (0.8), ratio e with A<0 (e), ratio 1 with A=1 (-1)
    out = ppo_clip_loss(make_inputs([[1.0, -1.0], [1.0, 0.0]], [[1.0, -1.0], [-1.0, 1.0]]))
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 + E - 1.0) / 4, rel=1e-6)
    assert out.metrics["clip_ratio/low"] == 0.25
    assert out.metrics["clip_ratio/high"] == 0.25
    assert out.metrics["clip_ratio"] == 0.5
    assert out.metrics["num_tokens"] == 4.0
    assert out.metrics["prob_mask_kept_frac"] == 1.0
    # ppo_kl = mean(old - new) = -(1 - 1 + 1 + 0) / 4
    assert out.metrics["ppo_kl"] == pytest.approx(-0.25)


# ---------------------------------------------------------------- masking


def test_fully_masked_batch_is_zero_and_backprops():
    inputs = make_inputs([[1.0, -1.0]], [[1.0, -1.0]], mask=[[0.0, 0.0]])
    out = ppo_clip_loss(inputs)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(inputs.logprobs.grad, torch.zeros(1, 2))
    assert out.metrics["num_tokens"] == 0.0
    assert out.metrics["clip_ratio"] == 0.0


def test_fully_masked_batch_with_kl_is_finite():
    inputs = make_inputs([[0.3]], [[1.0]], mask=[[0.0]], ref=[[2.0]])
    out = ppo_clip_loss(inputs, beta=0.5, kl_agg="seq_sum")
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(inputs.logprobs.grad, torch.zeros(1, 1))


def test_partially_masked_row():
    # ratio 1 everywhere; masked-in advantages 1 and 2 -> -(1 + 2) / 2; the 3 is padding.
    out = ppo_clip_loss(make_inputs([[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]], mask=[[1, 1, 0]]))
    assert out.loss.item() == pytest.approx(-1.5)
    assert out.metrics["num_tokens"] == 2.0


def test_garbage_in_padding_does_not_leak():
    inputs = make_inputs(
        [[0.0, float("nan")], [float("inf"), 0.0]],
        [[2.0, float("nan")], [float("inf"), 4.0]],
        mask=[[1, 0], [0, 1]],
    )
    out = ppo_clip_loss(inputs)
    assert out.loss.item() == pytest.approx(-3.0)
    out.loss.backward()
    assert torch.equal(inputs.logprobs.grad, torch.tensor([[-1.0, 0.0], [0.0, -2.0]]))


def test_bool_mask_accepted():
    inputs = make_inputs([[0.0, 0.0]], [[1.0, 3.0]])
    inputs.mask = torch.tensor([[True, False]])
    assert ppo_clip_loss(inputs).loss.item() == pytest.approx(-1.0)


def test_probability_mask():
    # p_old 0.95 is excluded (>= 0.9), 0.5 is included; ratio 1, so loss = -A of the kept token.
    old = [[math.log(0.95), math.log(0.5)]]
    out = ppo_clip_loss(make_inputs([[0.0, 0.0]], [[1.0, 3.0]], old=old), prob_mask_rho=0.9)
    assert out.loss.item() == pytest.approx(-3.0)
    assert out.metrics["num_tokens"] == 1.0
    assert out.metrics["prob_mask_kept_frac"] == 0.5
    # Without rho both tokens train.
    out = ppo_clip_loss(make_inputs([[0.0, 0.0]], [[1.0, 3.0]], old=old))
    assert out.loss.item() == pytest.approx(-2.0)


def test_probability_mask_is_strict_at_rho():
    # old logprob 0 -> p_old = 1 exactly; rho 1 excludes it (strict <), leaving only A = 3.
    inputs = make_inputs([[0.0, 0.0]], [[1.0, 3.0]], old=[[0.0, math.log(0.5)]])
    out = ppo_clip_loss(inputs, prob_mask_rho=1.0)
    assert out.loss.item() == pytest.approx(-3.0)
    # rho equal to the float32 probability of the token itself -> excluded.
    old = torch.tensor([[math.log(0.9)]], dtype=torch.float32)
    rho = float(torch.exp(old))
    inputs = make_inputs([[0.0]], [[1.0]], old=old.tolist())
    out = ppo_clip_loss(inputs, prob_mask_rho=rho)
    assert out.metrics["num_tokens"] == 0.0 and out.loss.item() == 0.0
    # The reference's rho = 0.9 on a float32 log(0.9) also excludes it (docs/algorithms.md#probability-mask).
    assert ppo_clip_loss(inputs, prob_mask_rho=0.9).metrics["num_tokens"] == 0.0


def test_probability_mask_does_not_revive_padding():
    out = ppo_clip_loss(
        make_inputs([[0.0, 0.0]], [[1.0, 3.0]], mask=[[0, 1]], old=[[math.log(0.5)] * 2]),
        prob_mask_rho=0.9,
    )
    assert out.loss.item() == pytest.approx(-3.0)
    assert out.metrics["prob_mask_kept_frac"] == 1.0


# ---------------------------------------------------------------- aggregation


def test_normalizer_override_is_sum_over_normalizer():
    out = ppo_clip_loss(make_inputs([[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]]), normalizer=10)
    assert out.loss.item() == pytest.approx(-6.0 / 10)


def test_normalizer_validation():
    inputs = make_inputs([[0.0]], [[1.0]])
    with pytest.raises(ValueError, match="normalizer"):
        ppo_clip_loss(inputs, normalizer=-1)
    with pytest.raises(ValueError, match="normalizer"):
        ppo_clip_loss(inputs, normalizer=0)
    # 0 is fine when nothing is masked in (an empty micro-batch of an empty mini-batch).
    empty = make_inputs([[0.0]], [[1.0]], mask=[[0.0]])
    assert ppo_clip_loss(empty, normalizer=0).loss.item() == 0.0


def test_seq_mean_token_mean_on_rows_of_different_length():
    # row 0: 2 tokens, A 1 and 3 -> mean 2; row 1: 4 tokens, A 2,2,2,6 -> mean 3;
    # row 2: no token, ignored. ratio 1 everywhere.
    adv = [[1.0, 3.0, 9.0, 9.0], [2.0, 2.0, 2.0, 6.0], [5.0, 5.0, 5.0, 5.0]]
    mask = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    inputs = make_inputs([[0.0] * 4] * 3, adv, mask=mask)
    seq = ppo_clip_loss(inputs, loss_agg="seq_mean_token_mean")
    assert seq.loss.item() == pytest.approx(-(2.0 + 3.0) / 2)
    tok = ppo_clip_loss(inputs, loss_agg="token_mean")
    assert tok.loss.item() == pytest.approx(-16.0 / 6)
    # normalizer counts rows in this mode
    four_rows = ppo_clip_loss(inputs, loss_agg="seq_mean_token_mean", normalizer=4)
    assert four_rows.loss.item() == pytest.approx(-5.0 / 4)


def test_gradient_at_ratio_one_is_minus_adv_over_token_count():
    # d/dlogp of -A * ratio at ratio 1 is -A; the token mean divides by N = 2.
    inputs = make_inputs([[0.0, 0.0, 0.0]], [[1.0, -2.0, 3.0]], mask=[[1, 1, 0]])
    ppo_clip_loss(inputs).loss.backward()
    assert torch.allclose(inputs.logprobs.grad, torch.tensor([[-0.5, 1.0, 0.0]]))
    inputs = make_inputs([[0.0, 0.0, 0.0]], [[1.0, -2.0, 3.0]], mask=[[1, 1, 0]])
    ppo_clip_loss(inputs, normalizer=4).loss.backward()
    assert torch.allclose(inputs.logprobs.grad, torch.tensor([[-0.25, 0.5, 0.0]]))


def test_clipped_tokens_have_zero_gradient():
    inputs = make_inputs([[1.0, -1.0, 1.0]], [[1.0, -1.0, -1.0]])
    ppo_clip_loss(inputs).loss.backward()
    # first two are on the clipped branch; the third is -A * ratio = e^x -> grad e / 3
    assert torch.allclose(inputs.logprobs.grad, torch.tensor([[0.0, 0.0, E / 3]]))


def test_log_ratio_clamp():
    # log-ratio 50 with A < 0 is unclipped: pg = -A * exp(clamp(50)) = e^10, finite.
    inputs = make_inputs([[50.0]], [[-1.0]])
    out = ppo_clip_loss(inputs)
    assert out.loss.item() == pytest.approx(math.exp(10.0), rel=1e-6)
    assert out.metrics["ratio_mean"] == pytest.approx(math.exp(10.0), rel=1e-6)
    out.loss.backward()
    assert inputs.logprobs.grad.item() == 0.0  # clamped: no gradient
    out = ppo_clip_loss(make_inputs([[-50.0]], [[1.0]]), log_ratio_clamp=2.0)
    assert out.loss.item() == pytest.approx(-math.exp(-2.0), rel=1e-6)


# ---------------------------------------------------------------- KL


K3_LOG2 = 2.0 - math.log(2.0) - 1.0  # d = log 2: e^d - d - 1


def test_k3_kl_both_aggregations():
    # A = 0 so the loss is beta * kl. d = ref - logp: row 0 [log 2, 0], row 1 [log 2, masked].
    lp = [[0.0, 0.0], [0.0, 0.0]]
    ref = [[math.log(2.0), 0.0], [math.log(2.0), 5.0]]
    inputs = make_inputs(lp, [[0.0, 0.0], [0.0, 0.0]], mask=[[1, 1], [1, 0]], ref=ref)
    tok = ppo_clip_loss(inputs, beta=0.5, kl_agg="token_mean")
    assert tok.kl.item() == pytest.approx(2 * K3_LOG2 / 3, rel=1e-6)
    assert tok.loss.item() == pytest.approx(0.5 * 2 * K3_LOG2 / 3, rel=1e-6)
    assert tok.metrics["kl"] == pytest.approx(2 * K3_LOG2 / 3, rel=1e-6)
    seq = ppo_clip_loss(inputs, beta=0.5, kl_agg="seq_sum")
    assert seq.kl.item() == pytest.approx((K3_LOG2 + K3_LOG2) / 2, rel=1e-6)
    assert seq.loss.item() == pytest.approx(0.5 * K3_LOG2, rel=1e-6)


def test_kl_token_mean_shares_the_normalizer():
    inputs = make_inputs([[0.0]], [[0.0]], ref=[[math.log(2.0)]])
    out = ppo_clip_loss(inputs, beta=1.0, normalizer=4)
    assert out.kl.item() == pytest.approx(K3_LOG2 / 4, rel=1e-6)


def test_kl_gradient_and_clamp():
    # dk3/dlogp = 1 - e^d; at d = log 2 that is -1.
    inputs = make_inputs([[0.0]], [[0.0]], ref=[[math.log(2.0)]])
    ppo_clip_loss(inputs, beta=1.0).loss.backward()
    assert inputs.logprobs.grad.item() == pytest.approx(-1.0, rel=1e-6)
    # d = 20 is clamped to 10: k3 = e^10 - 11
    out = ppo_clip_loss(make_inputs([[0.0]], [[0.0]], ref=[[20.0]]), beta=1.0)
    assert out.kl.item() == pytest.approx(math.exp(10.0) - 11.0, rel=1e-6)


def test_kl_reported_but_not_added_when_beta_zero():
    out = ppo_clip_loss(make_inputs([[0.0]], [[1.0]], ref=[[math.log(2.0)]]))
    assert out.loss.item() == pytest.approx(-1.0)
    assert out.metrics["kl"] == pytest.approx(K3_LOG2, rel=1e-6)


def test_beta_without_ref_raises():
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_clip_loss(make_inputs([[0.0]], [[1.0]]), beta=1e-4)


def test_argument_validation():
    good = make_inputs([[0.0, 0.0]], [[1.0, 1.0]])
    bad = LossInputs(good.logprobs, good.old_logprobs, torch.zeros(1, 3), good.mask)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(bad)
    with pytest.raises(ValueError, match="loss_agg"):
        ppo_clip_loss(good, loss_agg="seq_sum")
    with pytest.raises(ValueError, match="kl_agg"):
        ppo_clip_loss(good, kl_agg="mean")


# ---------------------------------------------------------------- whitening


def test_whiten_hand_example():
    out = masked_whiten(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
    # mean 2, Bessel var ((1 + 0 + 1) / 2) = 1
    assert torch.allclose(out, torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(1 + 1e-8))


def test_whiten_excludes_masked_entries_from_stats_but_transforms_them():
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    out = masked_whiten(values, torch.tensor([[1, 1], [1, 0]]))
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0], [1.0, 98.0]]), atol=1e-6)


def test_whiten_empty_mask_uses_all_entries():
    # [1, 3]: mean 2, Bessel var (1 + 1) / 1 = 2
    out = masked_whiten(torch.tensor([1.0, 3.0]), torch.zeros(2))
    assert torch.allclose(out, torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))


def test_whiten_single_entry_is_centred_not_nan():
    out = masked_whiten(torch.tensor([5.0, 7.0]), torch.tensor([True, False]))
    assert torch.equal(out, torch.tensor([0.0, 2.0]))


def test_whiten_equal_values_give_zero_and_keep_dtype():
    out = masked_whiten(torch.full((2, 3), 0.7, dtype=torch.bfloat16), torch.ones(2, 3))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros(2, 3, dtype=torch.bfloat16))


def test_whiten_shape_mismatch():
    with pytest.raises(ValueError):
        masked_whiten(torch.zeros(2, 3), torch.ones(3))


# ---------------------------------------------------------------- log-probs and entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_log_probs_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 4
    labels = torch.randint(0, 17, (3, 5), generator=g)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    got = token_log_probs(logits, labels, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)


def test_token_log_probs_gradient_and_bf16():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    token_log_probs(a, labels, 0.6).sum().backward()
    torch.log_softmax(b / 0.6, -1).gather(-1, labels[..., None]).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    half = token_log_probs(base.bfloat16(), labels)
    assert half.dtype == torch.float32
    ref = torch.log_softmax(base.bfloat16().float(), -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(half, ref, atol=1e-5)


def test_token_log_probs_validation():
    with pytest.raises(ValueError):
        token_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        token_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


def test_token_entropy_hand_values_and_reference():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([0.0, -float("inf"), -float("inf"), -float("inf")])
    ent = token_entropy(logits)
    # uniform over 4 -> log 4; a single allowed token -> 0
    assert torch.allclose(ent, torch.tensor([[math.log(4.0), 0.0]]))
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=g) * 3
    logp = torch.log_softmax(logits / 0.6, -1)
    expected = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(token_entropy(logits, 0.6), expected, atol=1e-5)
