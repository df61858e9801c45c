"""The critic's loss and its part of an RL update.

`clipped_value_loss` is pure tensor math. `critic_loss` computes it for one micro-batch with grad through the
critic, and `step_critic` applies the accumulated gradient; `spo_cli.optimize.step.ppo_update` calls both beside
the policy's loss, on the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from spo_cli.episode import Episode
from spo_cli.optimize.loss import loss_denominator

if TYPE_CHECKING:
    from spo_cli.distributed import Cluster
    from spo_cli.estimate.critic.model import ValueCritic
    from spo_cli.hardware import Runtime
    from spo_cli.policy import TokenBatch


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    *,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The critic's clipped value loss (TRL PPO, verl): new values may not move past ``V_old +- clip`` for free.

    Per token, over ``S = {mask != 0}``::

        V_clipped = clamp(values, old_values - clip, old_values + clip)
        l         = max((values - returns)^2, (V_clipped - returns)^2)
        loss      = 0.5 * sum_S(l) / normalizer          (normalizer defaults to |S|)

    Pass the masked-token count of the whole mini-batch as ``normalizer`` when accumulating gradients over
    micro-batches, so the micro-batch losses add up to the mini-batch's token mean. An empty mask gives an
    exact 0 that still backpropagates.

    Args:
        values (Tensor): ``[B, T]`` the critic's current values; carries the gradient.
        old_values (Tensor): ``[B, T]`` values when the advantages were estimated (``V_old``).
        returns (Tensor): ``[B, T]`` value targets ``G``.
        mask (Tensor): ``[B, T]`` 1 (or True) where the critic is trained.
        clip (float): ``cliprange_value`` (> 0).
        normalizer (float | None): denominator override; 0 only when nothing is masked in.

    Returns:
        (loss, metrics): scalar ``loss`` with grad; ``metrics`` has ``value_loss`` (its value),
        ``value_clipfrac`` (fraction of masked tokens where the clipped term is the larger, TRL's
        ``vf_clipfrac``), ``value_mean`` (mean masked value) and ``num_value_tokens``.

    Raises:
        ValueError: on shape mismatches, ``clip <= 0`` or an invalid ``normalizer``.
    """
    if values.dim() != 2:
        raise ValueError(f"values must have shape [B, T], got {tuple(values.shape)}")
    for name, tensor in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if tensor.shape != values.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(values.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    keep = mask != 0
    zero = values.new_zeros((), dtype=torch.float32)
    # Zeroing unmasked entries before any arithmetic (torch.where, not a multiplication) keeps NaN/inf at
    # padding out of the loss and out of its gradient.
    v = torch.where(keep, values.float(), zero)
    old = torch.where(keep, old_values.detach().float(), zero)
    target = torch.where(keep, returns.detach().float(), zero)
    clipped = torch.maximum(torch.minimum(v, old + clip), old - clip)
    unclipped_loss = (v - target).square()
    clipped_loss = (clipped - target).square()
    per_token = torch.where(keep, torch.maximum(unclipped_loss, clipped_loss), zero)
    count = float(keep.sum().item())
    loss = 0.5 * per_token.sum() / loss_denominator(count, normalizer, "value tokens")
    with torch.no_grad():
        clip_count, value_sum, loss_value = torch.stack(
            [(keep & (clipped_loss > unclipped_loss)).float().sum(), torch.where(keep, v, zero).sum(), loss.detach()]
        ).tolist()
    denom = max(count, 1.0)
    metrics = {
        "value_loss": loss_value,
        "value_clipfrac": clip_count / denom,
        "value_mean": value_sum / denom,
        "num_value_tokens": count,
    }
    return loss, metrics


def critic_loss(
    critic: ValueCritic, batch: TokenBatch, episodes: Sequence[Episode], normalizer: float, runtime: Runtime
) -> tuple[Tensor, dict[str, float]]:
    """The clipped value loss of one micro-batch (`batch` holds `episodes`), with grad through the critic."""
    with runtime.autocast():
        values = critic.model(batch)
    targets = [ep.value_targets for ep in episodes]
    mask = batch.scatter([[float(t is not None) for t in row] for row in targets])
    returns = batch.scatter([[0.0 if t is None else t for t in row] for row in targets])
    old_values = batch.scatter([ep.response_values for ep in episodes])
    return clipped_value_loss(values, old_values, returns, mask, critic.cliprange_value, normalizer=normalizer)


def step_critic(critic: ValueCritic, cluster: Cluster, max_grad_norm: float) -> float:
    """One optimizer step of the critic on the gradient its micro-batches accumulated: summed over processes
    (the critic is replicated and trained by hand), clipped to `max_grad_norm`; returns the norm before clipping."""
    cluster.sum_gradients(critic.model.parameters())
    norm = float(torch.nn.utils.clip_grad_norm_(critic.model.parameters(), max_grad_norm))
    critic.optimizer.step()
    critic.optimizer.zero_grad(set_to_none=True)
    return norm
