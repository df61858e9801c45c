"""One RL update: PPO epochs over an iteration's episodes, in mini-batches of accumulated micro-batches."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from spo_cli.episode import Episode, token_advantages
from spo_cli.hardware import Runtime
from spo_cli.optimize.loss import LossInputs, clipped_value_loss, masked_whiten, ppo_clip_loss
from spo_cli.policy import collate, forward_logprobs, score_responses
from spo_cli.recipe import PpoClip, Train

if TYPE_CHECKING:
    from spo_cli.critic import ValueCritic
    from spo_cli.optimize.learner import AccelerateLearner, LocalLearner

    Learner = LocalLearner | AccelerateLearner


def trained_token_count(episode: Episode, prob_mask_rho: float | None) -> int:
    """Response tokens the loss trains on (all of them, or those with p_old < rho)."""
    if prob_mask_rho is None:
        return len(episode.response_token_ids)
    return sum(1 for lp in episode.response_logprobs if math.exp(lp) < prob_mask_rho)


def select_trainable(episodes: Sequence[Episode], loss: PpoClip, train_critic: bool = False) -> list[Episode]:
    """Episodes that can move the policy, or the critic when one trains (any value target); all of them unless
    zero-advantage ones may be skipped."""
    if not loss.skip_zero_advantage or loss.beta > 0 or loss.whiten_advantages:
        return list(episodes)
    return [
        ep
        for ep in episodes
        if any(a != 0.0 for a in token_advantages(ep))
        or (train_critic and any(t is not None for t in ep.value_targets or []))
    ]


def steps_per_iteration(num_episodes: int, train: Train, world_size: int = 1) -> int:
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    return train.ppo_epochs * math.ceil(num_episodes / per_step)


def ppo_update(
    learner: Learner,
    episodes: Sequence[Episode],
    *,
    loss: PpoClip,
    train: Train,
    temperature: float,
    runtime: Runtime,
    pad_id: int,
    rng: random.Random,
    ref_model=None,
    critic: ValueCritic | None = None,
    on_optimizer_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run `train.ppo_epochs` passes of PPO-clip over `episodes` (which carry segment advantages).

    pi_old is the sampling-time log-prob stored in each episode. Every mini-batch of
    `per_device_train_batch_size * gradient_accumulation_steps` episodes per process is one optimizer step; the
    token-mean loss is normalised by the trained tokens of the whole mini-batch (all processes' shares), so
    accumulation and data parallelism give the same gradient as one big batch (the reference averages
    per-micro-batch means instead: docs/reference_differences.md#token-mean-over-the-mini-batch-not-per-micro-batch).

    With several processes every process holds all `episodes` and the same shuffle; each trains the episodes
    `rank::world_size` of every mini-batch. A process with fewer micro-batches than another runs a zero-weighted
    one, so every process does the same collective work.

    With a `critic`, every micro-batch also runs the value model with grad and adds `vf_coef` times the
    clipped value loss over the tokens with a value target (normalised over the mini-batch's such tokens,
    like the policy loss); the critic's gradient is summed over processes, clipped to the learner's max_grad_norm,
    and its optimizer steps with the policy's. Its gradients come from the value loss alone: the two models share
    no parameters.

    `on_optimizer_step(n)` is called after the n-th optimizer step (1-based) of this update.
    """
    cluster = learner.cluster
    rho = loss.prob_mask_rho if loss.use_prob_mask else None
    missing = next((ep.id for ep in episodes if ep.response_logprobs is None), None)
    if missing is not None:
        raise ValueError(f"episode {missing} has no response_logprobs (pi_old): run the partition stage to score it")
    if critic is not None:
        missing = next((ep.id for ep in episodes if ep.response_values is None or ep.value_targets is None), None)
        if missing is not None:
            raise ValueError(
                f"episode {missing} has no response_values/value_targets: training a critic needs an estimator "
                "that writes them (estimator.kind=gae, or segment_gae with a critic)"
            )
    episodes = select_trainable(episodes, loss, train_critic=critic is not None)
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    if not episodes:
        return {"optimizer_steps": 0.0, "trained_episodes": 0.0}

    advantages = [token_advantages(ep) for ep in episodes]
    ref_logprobs: list[list[float]] | None = None
    if loss.beta > 0:

        def score_reference(part: list[Episode]) -> list[list[float]]:
            scored, _ = score_responses(
                ref_model,
                [ep.prompt_token_ids for ep in part],
                [ep.response_token_ids for ep in part],
                pad_id=pad_id,
                temperature=temperature,
                batch_size=train.per_device_train_batch_size,
                device=runtime.device,
                autocast=runtime.autocast,
            )
            return scored

        ref_logprobs = cluster.map_shards(score_reference, episodes)
    trained_tokens = [trained_token_count(ep, rho) for ep in episodes]
    value_tokens = [sum(t is not None for t in ep.value_targets or []) for ep in episodes]
    world = cluster.world_size
    micro = train.per_device_train_batch_size
    per_step = micro * train.gradient_accumulation_steps * world
    steps = 0
    grad_norms = value_grad_norms = 0.0
    learner.model.train()
    if critic is not None:
        critic.model.train()
    for _ in range(train.ppo_epochs):
        order = list(range(len(episodes)))
        if train.shuffle_episodes:
            rng.shuffle(order)
        for mb_start in range(0, len(order), per_step):
            mini = order[mb_start : mb_start + per_step]
            if loss.loss_agg == "token_mean":
                normalizer = float(sum(trained_tokens[i] for i in mini))
            else:
                normalizer = float(sum(1 for i in mini if trained_tokens[i] > 0))
            value_normalizer = float(sum(value_tokens[i] for i in mini))
            mine = mini[cluster.rank :: world]
            n_micro = math.ceil(math.ceil(len(mini) / world) / micro)
            for k in range(n_micro):
                idx = mine[k * micro : (k + 1) * micro]
                # An empty share still runs forward and backward (on any episode, weighted 0): collectives match.
                real = bool(idx)
                idx = idx or mini[:1]
                with learner.micro_batch(last=k == n_micro - 1):
                    batch = collate(
                        [episodes[i].prompt_token_ids for i in idx], [episodes[i].response_token_ids for i in idx], pad_id
                    ).to(runtime.device)
                    with runtime.autocast():
                        logprobs, entropy = forward_logprobs(learner.model, batch, temperature, with_entropy=True)
                    adv = batch.scatter([advantages[i] for i in idx])
                    old = batch.scatter([episodes[i].response_logprobs for i in idx])
                    mask = batch.response_mask
                    if loss.whiten_advantages:
                        keep = mask if rho is None else mask * (old.exp() < rho)
                        adv = masked_whiten(adv, keep)
                    ref = batch.scatter([ref_logprobs[i] for i in idx]) if ref_logprobs is not None else None
                    out = ppo_clip_loss(
                        LossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref),
                        epsilon_low=loss.epsilon,
                        epsilon_high=loss.epsilon_high if loss.epsilon_high is not None else loss.epsilon,
                        beta=loss.beta,
                        prob_mask_rho=rho,
                        loss_agg=loss.loss_agg,
                        kl_agg=loss.kl_agg,
                        normalizer=normalizer,
                        kl_normalizer=float(len(mini)),
                        clip_ratio_c=loss.clip_ratio_c,
                    )
                    skipped = loss.skip_ratio_above is not None and out.metrics["ratio_mean"] > loss.skip_ratio_above
                    # The reference drops a micro-batch whose policy has drifted too far (ratio explosion)
                    # but still runs backward, so every rank does the same collective work.
                    total = out.loss * 0.0 if skipped or not real else out.loss
                    if critic is not None:
                        value_loss, value_metrics = _critic_loss(
                            critic, batch, [episodes[i] for i in idx], value_normalizer, runtime
                        )
                        total = total + critic.vf_coef * value_loss * float(real)
                    # DDP and DeepSpeed average gradients over processes; each share is normalised by the whole
                    # mini-batch, so the sum over processes is the loss: undo the average.
                    learner.backward(total * world)
                if not real:
                    continue
                if critic is not None:
                    sums["value_loss"] += value_metrics["value_loss"]
                    for key in ("value_clipfrac", "value_mean"):
                        sums[key] += value_metrics[key] * value_metrics["num_value_tokens"]
                        weights[key] += value_metrics["num_value_tokens"]
                sums["skipped_micro_batches"] += float(skipped)
                n_tok = out.metrics.get("num_tokens", 0.0)
                for key in ("clip_ratio", "clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "ratio_mean"):
                    if key in out.metrics:
                        sums[key] += out.metrics[key] * n_tok
                        weights[key] += n_tok
                # The normaliser spans the mini-batch, so micro-batch losses add up to the step's loss.
                sums["policy_loss"] += float(out.policy_loss)
                sums["kl"] += float(out.kl)
                n_resp = float(mask.sum())
                sums["entropy"] += float((entropy * mask).sum())
                weights["entropy"] += n_resp
            grad_norms += learner.step()
            if critic is not None:
                cluster.sum_gradients(critic.model.parameters())
                value_grad_norms += float(torch.nn.utils.clip_grad_norm_(critic.model.parameters(), learner.max_grad_norm))
                critic.optimizer.step()
                critic.optimizer.zero_grad(set_to_none=True)
            steps += 1
            if on_optimizer_step is not None:
                on_optimizer_step(steps)
    sums = cluster.sum_floats(sums)
    weights = cluster.sum_floats(weights)
    metrics = {k: sums[k] / weights[k] for k in sums if weights.get(k, 0.0) > 0}
    metrics["skipped_micro_batches"] = sums.get("skipped_micro_batches", 0.0)
    metrics["policy_loss"] = sums.get("policy_loss", 0.0) / steps
    metrics["grad_norm"] = grad_norms / steps
    metrics["kl"] = sums.get("kl", 0.0) / steps
    if critic is not None:
        # Like policy_loss: micro-batch losses add up to the step's loss, so average over steps.
        metrics["value_loss"] = sums.get("value_loss", 0.0) / steps
        metrics["value_grad_norm"] = value_grad_norms / steps
    metrics["optimizer_steps"] = float(steps)
    metrics["trained_episodes"] = float(len(episodes))
    metrics["learning_rate"] = learner.learning_rate
    return metrics


def _critic_loss(
    critic: ValueCritic, batch, episodes: Sequence[Episode], normalizer: float, runtime: Runtime
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss of one micro-batch (`batch` holds `episodes`), with grad through the critic."""
    with runtime.autocast():
        values = critic.model(batch)
    targets = [ep.value_targets for ep in episodes]
    mask = batch.scatter([[float(t is not None) for t in row] for row in targets])
    returns = batch.scatter([[0.0 if t is None else t for t in row] for row in targets])
    old_values = batch.scatter([ep.response_values for ep in episodes])
    return clipped_value_loss(values, old_values, returns, mask, critic.cliprange_value, normalizer=normalizer)
