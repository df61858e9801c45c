"""PPO clipped policy loss with the SPO probability mask, k3 KL, whitening and log-prob helpers.

Pure tensor functions: no config objects, no I/O. Reference semantics are those of treetune's
``PPOTrainer._compute_actor_loss`` and ``masked_whiten`` (docs/algorithms.md#policy-optimization), with the
reference's NaN cases (empty mask, single whitening entry) replaced by finite results
(docs/reference_differences.md#finite-results-where-the-reference-gives-nan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LossInputs",
    "LossOutputs",
    "loss_denominator",
    "masked_whiten",
    "ppo_clip_loss",
    "token_entropy",
    "token_log_probs",
]

# The reference clamps the reference/policy log-ratio of the k3 estimator to +-10 (docs/algorithms.md#kl-term).
_KL_LOG_RATIO_CLAMP = 10.0


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch, all of shape ``[B, T]``.

    Attributes:
        logprobs (Tensor): ``log pi_theta(y_t)`` at the training temperature; requires grad.
        old_logprobs (Tensor): ``log pi_old(y_t)`` of the sampling policy.
        advantages (Tensor): per-token advantages (already broadcast from segments/sequences).
        mask (Tensor): 1 (or True) for response tokens that may be trained, 0 for prompt/padding.
        ref_logprobs (Tensor | None): reference-policy log-probs; ``None`` when ``beta == 0``.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor
    ref_logprobs: Tensor | None = None


@dataclass
class LossOutputs:
    """Result of :func:`ppo_clip_loss`.

    Attributes:
        loss (Tensor): scalar ``policy_loss + beta * kl``, attached to the graph of ``logprobs``.
        policy_loss (Tensor): detached scalar clipped-surrogate term.
        kl (Tensor): detached scalar k3 KL (before multiplying by ``beta``); 0 without
            ``ref_logprobs``.
        metrics (dict[str, float]): ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio``,
            ``kl``, ``ratio_mean``, ``ppo_kl``, ``num_tokens``, ``prob_mask_kept_frac``,
            ``policy_loss``, ``loss``.
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def loss_denominator(count: float, normalizer: float | None, what: str) -> float:
    """What a summed loss over `count` masked items is divided by: `normalizer` (a whole mini-batch's count when
    micro-batches accumulate), else `count`; 1 for an empty micro-batch."""
    if normalizer is None:
        # An empty micro-batch has a zero numerator; dividing by 1 keeps the loss at an
        # exact, differentiable 0 where the reference produced 0/0 = NaN.
        return count if count > 0 else 1.0
    if not math.isfinite(normalizer) or normalizer < 0:
        raise ValueError(f"normalizer must be a finite number >= 0, got {normalizer}")
    if normalizer == 0:
        if count > 0:
            raise ValueError(f"normalizer is 0 but the micro-batch has {count:g} masked {what}")
        return 1.0
    return float(normalizer)


def ppo_clip_loss(
    inputs: LossInputs,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    prob_mask_rho: float | None = None,
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = "token_mean",
    kl_agg: Literal["token_mean", "seq_sum"] = "token_mean",
    normalizer: float | None = None,
    kl_normalizer: float | None = None,
    log_ratio_clamp: float = 10.0,
    clip_ratio_c: float | None = None,
) -> LossOutputs:
    """Compute the PPO clipped surrogate loss with an optional p_old < rho mask and k3 KL term.

    Per token, with effective mask ``m = mask * 1[exp(old_logprobs) < prob_mask_rho]`` (the
    second factor only when ``prob_mask_rho`` is not ``None``; strict ``<`` as the reference)::

        ratio = exp(clamp(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp))
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - epsilon_low, 1 + epsilon_high))
        pg    = min(pg, -A * clip_ratio_c)   where A < 0, with the dual clip (clip_ratio_c given)
        k3    = exp(d) - d - 1,  d = clamp(ref_logprobs - logprobs, -10, 10)

    ``pg`` is aggregated over masked tokens by `aggregate_policy_loss` (``loss_agg``, ``normalizer``), ``k3`` by
    `aggregate_kl` (``kl_agg``, ``kl_normalizer``; when ``beta > 0``, or for the metric whenever ``ref_logprobs``
    is given). ``loss = policy_loss + beta * kl``. A micro-batch with no masked token gives ``loss == 0``
    that still backpropagates (zero gradients), unlike the reference's NaN. The reference's
    high-ratio skip (zero the loss when ``metrics["ratio_mean"] > 10``) is left to the caller.

    Args:
        inputs (LossInputs): tensors of shape ``[B, T]``; ``logprobs`` carries the gradient.
        epsilon_low (float): lower clip range, ``ratio >= 1 - epsilon_low``. Default 0.2.
        epsilon_high (float): upper clip range, ``ratio <= 1 + epsilon_high``. Default 0.2.
        beta (float): KL coefficient; ``> 0`` requires ``inputs.ref_logprobs``. Default 0.
        prob_mask_rho (float | None): train only tokens with ``p_old < prob_mask_rho``
            (SPO uses 0.9); ``None`` disables the probability mask. Default ``None``.
        loss_agg (str): ``"token_mean"`` or ``"seq_mean_token_mean"``. Default ``"token_mean"``.
        kl_agg (str): ``"token_mean"`` or ``"seq_sum"``. Default ``"token_mean"``.
        normalizer (float | None): denominator override for the ``pg`` aggregation (tokens for
            ``token_mean``, rows for ``seq_mean_token_mean``). 0 is allowed only when nothing is
            masked in. Default ``None``.
        kl_normalizer (float | None): denominator of the ``seq_sum`` KL; default ``B``.
        log_ratio_clamp (float): bound on ``|logprobs - old_logprobs|`` before ``exp``. Default 10.
        clip_ratio_c (float | None): dual clip (Ye et al. 2020, verl's ``clip_ratio_c``): for a negative
            advantage the token loss is at most ``-A * clip_ratio_c`` (> 1), so a token whose ratio exploded
            cannot dominate the update. ``None`` disables it. Default ``None``.

    Returns:
        LossOutputs: ``loss`` (scalar, with grad), detached scalars ``policy_loss`` and ``kl``,
        and float ``metrics``.

    Raises:
        ValueError: on shape mismatches, unknown aggregation modes, negative clip ranges or
            ``beta``, ``beta > 0`` without ``ref_logprobs``, or an invalid ``normalizer``.
    """
    _check_loss_inputs(inputs, epsilon_low, epsilon_high, beta, loss_agg, kl_agg, clip_ratio_c)
    keep = inputs.mask != 0
    if prob_mask_rho is not None:
        # Compared in old_logprobs' own dtype, like the reference: exp(float32(log 0.9)) is
        # float32(0.9), so a token at exactly rho is excluded.
        keep = keep & (torch.exp(inputs.old_logprobs.detach()) < prob_mask_rho)
    logp = inputs.logprobs.float()
    terms = clipped_token_losses(logp, inputs, keep, epsilon_low, epsilon_high, log_ratio_clamp, clip_ratio_c)
    policy_loss, num_tokens, token_denom = aggregate_policy_loss(terms.pg, keep, loss_agg, normalizer)
    kl = logp.new_zeros(())
    if inputs.ref_logprobs is not None:
        kl = aggregate_kl(inputs.ref_logprobs, logp, keep, kl_agg, token_denom, kl_normalizer)
    loss = policy_loss + beta * kl if beta > 0 else policy_loss
    metrics = _loss_metrics(terms, keep, inputs.mask != 0, num_tokens, kl, policy_loss, loss, epsilon_low, epsilon_high)
    return LossOutputs(loss=loss, policy_loss=policy_loss.detach(), kl=kl.detach(), metrics=metrics)


def _check_loss_inputs(
    inputs: LossInputs, epsilon_low: float, epsilon_high: float, beta: float, loss_agg: str, kl_agg: str,
    clip_ratio_c: float | None,
) -> None:  # fmt: skip
    tensors = {
        "logprobs": inputs.logprobs,
        "old_logprobs": inputs.old_logprobs,
        "advantages": inputs.advantages,
        "mask": inputs.mask,
    }
    if inputs.ref_logprobs is not None:
        tensors["ref_logprobs"] = inputs.ref_logprobs
    if inputs.logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {tuple(inputs.logprobs.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != inputs.logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(inputs.logprobs.shape)}"
            )
    if loss_agg not in ("token_mean", "seq_mean_token_mean"):
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    if kl_agg not in ("token_mean", "seq_sum"):
        raise ValueError(f"unknown kl_agg {kl_agg!r}")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got {epsilon_low} and {epsilon_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and inputs.ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")


@dataclass
class TokenTerms:
    """Per-token pieces of the clipped surrogate, all ``[B, T]`` (``dual_clipped`` None without the dual clip)."""

    pg: Tensor  # the clipped token losses, 0 outside the mask
    ratio: Tensor
    log_ratio: Tensor  # logprobs - old_logprobs, 0 outside the mask
    adv: Tensor
    dual_clipped: Tensor | None  # masked tokens whose loss the dual clip capped


def clipped_token_losses(
    logp: Tensor, inputs: LossInputs, keep: Tensor, epsilon_low: float, epsilon_high: float, log_ratio_clamp: float,
    clip_ratio_c: float | None,
) -> TokenTerms:  # fmt: skip
    """``pg`` per token (the formula of `ppo_clip_loss`) for ``logp`` = the float32 ``[B, T]`` log-probs with grad,
    on the tokens where the bool mask ``keep`` is set."""
    old = inputs.old_logprobs.detach().float()
    adv = inputs.advantages.detach().float()
    zero = logp.new_zeros(())
    # torch.where rather than multiplying by m, so NaN/inf in padding positions cannot leak
    # into the loss or its gradient.
    log_ratio = torch.where(keep, logp - old, zero)
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_clipped = None
    if clip_ratio_c is not None:
        capped = torch.minimum(pg, -adv * clip_ratio_c)
        dual_clipped = keep & (adv < 0) & (capped < pg)
        pg = torch.where(adv < 0, capped, pg)
    return TokenTerms(torch.where(keep, pg, zero), ratio, log_ratio, adv, dual_clipped)


def aggregate_policy_loss(
    pg: Tensor, keep: Tensor, loss_agg: str, normalizer: float | None
) -> tuple[Tensor, float, float]:
    """The policy loss from token losses ``pg`` ``[B, T]`` (0 outside the bool mask ``keep``):

    * ``"token_mean"``: ``sum(m * pg) / normalizer``; ``normalizer`` defaults to ``sum(m)``.
      Pass the masked-token count of the whole mini-batch when accumulating gradients over
      micro-batches to get a global token mean.
    * ``"seq_mean_token_mean"``: per-row token mean, summed over rows with at least one masked
      token and divided by ``normalizer``, which defaults to the number of such rows.

    Returns (loss, masked token count, the token denominator the ``token_mean`` KL shares: the loss's under
    ``token_mean``, ``sum(m)`` under ``seq_mean_token_mean``, whose ``normalizer`` counts rows).
    """
    row_tokens = keep.float().sum(dim=-1)
    num_tokens = float(row_tokens.sum().item())
    if loss_agg == "token_mean":
        token_denom = loss_denominator(num_tokens, normalizer, "tokens")
        return pg.sum() / token_denom, num_tokens, token_denom
    num_rows = float((row_tokens > 0).sum().item())
    row_mean = pg.sum(dim=-1) / row_tokens.clamp(min=1.0)
    policy_loss = row_mean.sum() / loss_denominator(num_rows, normalizer, "rows")
    return policy_loss, num_tokens, num_tokens if num_tokens > 0 else 1.0


def aggregate_kl(
    ref_logprobs: Tensor, logp: Tensor, keep: Tensor, kl_agg: str, token_denom: float, kl_normalizer: float | None
) -> Tensor:
    """The k3 KL to the reference over the masked tokens, ``[B, T]`` inputs:

    * ``"token_mean"``: ``sum(m * k3) / token_denom`` (`aggregate_policy_loss`'s).
    * ``"seq_sum"``: per-sequence sum, averaged over all ``B`` sequences (the reference's;
      docs/algorithms.md#kl-term), or divided by ``kl_normalizer`` when given (the sequence count
      of a whole mini-batch, for gradient accumulation).
    """
    d = (ref_logprobs.detach().float() - logp).clamp(-_KL_LOG_RATIO_CLAMP, _KL_LOG_RATIO_CLAMP)
    k3 = torch.where(keep, torch.exp(d) - d - 1.0, logp.new_zeros(()))
    if kl_agg == "token_mean":
        return k3.sum() / token_denom
    return k3.sum(dim=-1).sum() / (kl_normalizer if kl_normalizer else max(k3.shape[0], 1))


def _loss_metrics(
    terms: TokenTerms, keep: Tensor, response: Tensor, num_tokens: float, kl: Tensor, policy_loss: Tensor,
    loss: Tensor, epsilon_low: float, epsilon_high: float,
) -> dict[str, float]:  # fmt: skip
    zero = terms.ratio.new_zeros(())
    adv, ratio = terms.adv, terms.ratio
    with torch.no_grad():
        count = max(num_tokens, 1.0)
        clipped_low = keep & (adv < 0) & (ratio < 1.0 - epsilon_low)
        clipped_high = keep & (adv > 0) & (ratio > 1.0 + epsilon_high)
        # One stacked .tolist() so a GPU caller pays a single device sync for all metrics.
        dual = terms.dual_clipped.float().sum() if terms.dual_clipped is not None else zero
        low, high, dual_count, ratio_sum, neg_log_ratio_sum, kl_value, pl_value, loss_value = torch.stack(
            [
                clipped_low.float().sum(),
                clipped_high.float().sum(),
                dual,
                torch.where(keep, ratio, zero).sum(),
                -terms.log_ratio.sum(),
                kl.detach(),
                policy_loss.detach(),
                loss.detach(),
            ]
        ).tolist()
        num_response = float(response.sum().item())
    return {
        "clip_ratio/low": low / count,
        "clip_ratio/high": high / count,
        "clip_ratio": (low + high) / count,
        "clip_ratio/dual": dual_count / count,
        "kl": kl_value,
        "ratio_mean": ratio_sum / count,
        "ppo_kl": neg_log_ratio_sum / count,
        "num_tokens": num_tokens,
        "prob_mask_kept_frac": num_tokens / num_response if num_response > 0 else 0.0,
        "policy_loss": pl_value,
        "loss": loss_value,
    }


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Standardise ``values`` with the mean and Bessel-corrected variance of the masked entries.

    ``mu = mean_S(values)``, ``var = sum_S (values - mu)^2 / (|S| - 1)`` over
    ``S = {mask != 0}`` (all entries if the mask selects none), and
    ``(values - mu) / sqrt(var + eps)`` is applied to every entry, masked or not
    (the reference's; docs/algorithms.md#advantage-whitening). With ``|S| == 1`` the variance is
    undefined and the reference returns NaN; here the result is ``values - mu`` instead.

    Args:
        values (Tensor): values to whiten, any shape, e.g. advantages ``[B, T]``.
        mask (Tensor): same shape as ``values``; non-zero entries enter the statistics.
        eps (float): added to the variance. Default ``1e-8``.

    Returns:
        Tensor: same shape and dtype as ``values``.

    Raises:
        ValueError: if ``mask`` and ``values`` differ in shape.
    """
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    selected = mask != 0
    if not bool(selected.any()):
        selected = torch.ones_like(selected)
    stats_dtype = torch.promote_types(values.dtype, torch.float32)
    x = values.to(stats_dtype)
    sample = x[selected]
    n = sample.numel()
    if n == 0:
        return values.clone()
    mu = sample.mean()
    if n == 1:
        return (x - mu).to(values.dtype)
    var = (sample - mu).square().sum() / (n - 1)
    return ((x - mu) * torch.rsqrt(var + eps)).to(values.dtype)


def _check_logits(logits: Tensor, labels: Tensor | None, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    if labels is not None and labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits shape[:2] {tuple(logits.shape[:2])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Gather ``log_softmax(logits / temperature)`` at ``labels``, in float32.

    Computed as ``logit[label] - logsumexp(logits)`` a few sequences at a time (at most
    ``_CHUNK_ELEMENTS`` logits), so no full ``[B, T, V]`` float32 log-softmax of a (possibly bf16)
    batch is materialised. Differentiable w.r.t. ``logits``.

    Args:
        logits (Tensor): ``[B, T, V]`` logits aligned with ``labels`` (already shifted).
        labels (Tensor): ``[B, T]`` token ids in ``[0, V)``; mask ignored positions afterwards
            rather than passing an ignore index.
        temperature (float): divides the logits before the softmax. Default 1.0.

    Returns:
        Tensor: ``[B, T]`` float32 log-probabilities.

    Raises:
        ValueError: on shape mismatches or ``temperature <= 0``.
    """
    _check_logits(logits, labels, temperature)
    if logits.shape[0] == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    rows = []
    for start, stop in _row_chunks(logits):
        z = logits[start:stop].float()
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, labels[start:stop].long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.cat(rows)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in float32.

    Meant for metrics; call it under ``torch.no_grad()``. Processes a few sequences at a time
    for the same memory reason as :func:`token_log_probs`; ``-inf`` logits (banned tokens)
    contribute 0.

    Args:
        logits (Tensor): ``[B, T, V]`` logits.
        temperature (float): divides the logits before the softmax. Default 1.0.

    Returns:
        Tensor: ``[B, T]`` float32 entropies in nats.

    Raises:
        ValueError: on a non-3D ``logits`` or ``temperature <= 0``.
    """
    _check_logits(logits, None, temperature)
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    rows = []
    for start, stop in _row_chunks(logits):
        z = logits[start:stop].float()
        if temperature != 1.0:
            z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        # 0 * -inf is NaN; a zero-probability token contributes nothing to the entropy.
        expected_logit = torch.where(p > 0, p * z, z.new_zeros(())).sum(dim=-1)
        rows.append(log_z - expected_logit)
    return torch.cat(rows)


# Logits per chunk in token_log_probs / token_entropy: 2**24 float32 values = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(logits: Tensor) -> list[tuple[int, int]]:
    """Row ranges of ``logits`` [B, T, V] holding at most ``_CHUNK_ELEMENTS`` values (>= 1 row)."""
    per_row = max(1, logits.shape[1] * logits.shape[2])
    step = max(1, _CHUNK_ELEMENTS // per_row)
    return [(i, min(i + step, logits.shape[0])) for i in range(0, logits.shape[0], step)]
