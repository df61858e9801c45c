"""One RL update: PPO epochs over an iteration's episodes, in mini-batches of accumulated micro-batches."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING


from spo_cli.episode import Episode, policy_token_mask, token_advantages
from spo_cli.hardware import Runtime
from spo_cli.estimate.critic.loss import critic_loss, step_critic
from spo_cli.optimize.loss import LossInputs, LossOutputs, masked_whiten, ppo_clip_loss
from spo_cli.policy import collate, pack, packed_logprobs, score_responses, shares_prompts
from spo_cli.recipe import PpoClip, Train

if TYPE_CHECKING:
    from spo_cli.estimate.critic.model import ValueCritic
    from spo_cli.optimize.learner import AccelerateLearner, LocalLearner

    Learner = LocalLearner | AccelerateLearner


def trained_token_count(episode: Episode, prob_mask_rho: float | None) -> int:
    """Response tokens the loss trains on: the policy's (not a tool's), all of them or those with p_old < rho."""
    policy = policy_token_mask(episode)
    if prob_mask_rho is None:
        return int(sum(policy))
    return sum(1 for lp, mine in zip(episode.response_logprobs, policy) if mine and math.exp(lp) < prob_mask_rho)


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
    _check_update_inputs(episodes, critic)
    episodes = select_trainable(episodes, loss, train_critic=critic is not None)
    if not episodes:
        return {"optimizer_steps": 0.0, "trained_episodes": 0.0}
    cluster = learner.cluster
    rho = loss.prob_mask_rho if loss.use_prob_mask else None
    inputs = UpdateInputs(
        episodes=list(episodes),
        advantages=[token_advantages(ep) for ep in episodes],
        ref_logprobs=_reference_logprobs(ref_model, episodes, cluster, train, temperature, runtime, pad_id, loss.beta),
        rho=rho,
    )
    plan = mini_batch_plan(
        [trained_token_count(ep, rho) for ep in episodes],
        [sum(t is not None for t in ep.value_targets or []) for ep in episodes],
        train, loss.loss_agg, cluster.rank, cluster.world_size, rng,
        PromptLayout(
            keys=[tuple(ep.prompt_token_ids) for ep in episodes],
            prompt_lengths=[len(ep.prompt_token_ids) for ep in episodes],
            response_lengths=[len(ep.response_token_ids) for ep in episodes],
            # Regrouping a process's share into micro-batches leaves the gradient as it is (every micro-batch is
            # normalised by its mini-batch), unless a setting acts per micro-batch.
            group_by_prompt=not loss.whiten_advantages and loss.skip_ratio_above is None,
        ),
    )  # fmt: skip
    sums = UpdateSums()
    learner.model.train()
    if critic is not None:
        critic.model.train()
    for steps, mini in enumerate(plan, start=1):
        for k, micro in enumerate(mini.micro_batches):
            _train_micro_batch(learner, inputs, mini, micro, last=k == len(mini.micro_batches) - 1, loss=loss,
                               temperature=temperature, runtime=runtime, pad_id=pad_id, critic=critic, sums=sums)  # fmt: skip
        sums.grad_norm += learner.step()
        if critic is not None:
            sums.value_grad_norm += step_critic(critic, cluster, learner.max_grad_norm)
        if on_optimizer_step is not None:
            on_optimizer_step(steps)
    return update_metrics(sums, len(plan), len(episodes), learner.learning_rate, cluster, critic is not None)


@dataclass
class UpdateInputs:
    """What every micro-batch of one update reads: the trainable episodes with their token advantages, the
    reference model's log-probs (when the loss has a KL term) and the probability-mask threshold."""

    episodes: list[Episode]
    advantages: list[list[float]]
    ref_logprobs: list[list[float]] | None
    rho: float | None


@dataclass(frozen=True)
class MicroBatch:
    """Episode indices one process trains in one forward/backward pass. A filler (`real` False) repeats an episode
    of the mini-batch with weight 0, so a process with fewer micro-batches than another does the same
    collective work."""

    indices: list[int]
    real: bool


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step: every process's episodes (`indices`), this process's micro-batches, and the
    normalisers the losses of all micro-batches of all processes share."""

    indices: list[int]
    micro_batches: list[MicroBatch]
    normalizer: float
    value_normalizer: float


@dataclass(frozen=True)
class PromptLayout:
    """Per episode, what cutting micro-batches needs beyond token counts: its prompt (a hashable key) and prompt and
    response lengths; and whether a process's share may be regrouped so episodes of one prompt are neighbours."""

    keys: Sequence[Hashable]
    prompt_lengths: Sequence[int]
    response_lengths: Sequence[int]
    group_by_prompt: bool


def mini_batch_plan(
    trained_tokens: Sequence[int],
    value_tokens: Sequence[int],
    train: Train,
    loss_agg: str,
    rank: int,
    world_size: int,
    rng: random.Random,
    layout: PromptLayout | None = None,
) -> list[MiniBatch]:
    """The mini-batches of `train.ppo_epochs` passes over episodes with these trained and value-target token
    counts: each epoch shuffles the order (when `train.shuffle_episodes`), cuts it into mini-batches of
    `micro * accumulation * world_size` episodes, and gives process `rank` the episodes `rank::world_size` of
    each, in micro-batches of `per_device_train_batch_size` episodes or, with `train.max_tokens_per_micro_batch`
    (which needs `layout`), of at most that many packed tokens; every process runs as many micro-batches as the
    busiest (the others are fillers).

    With `layout.group_by_prompt`, a process's share of a mini-batch is ordered so that episodes with the same
    prompt are neighbours before it is cut: `pack` then reads each prompt once per micro-batch.

    The token-mean normaliser is the mini-batch's trained tokens; the sequence-mean one its episodes with any
    trained token."""
    micro = train.per_device_train_batch_size
    per_step = micro * train.gradient_accumulation_steps * world_size
    plan = []
    for _ in range(train.ppo_epochs):
        order = list(range(len(trained_tokens)))
        if train.shuffle_episodes:
            rng.shuffle(order)
        for start in range(0, len(order), per_step):
            mini = order[start : start + per_step]
            cuts = [_micro_batches(mini[r::world_size], train, layout) for r in range(world_size)]
            n_micro = max(len(c) for c in cuts)
            micro_batches = [MicroBatch(c, True) if c else MicroBatch(mini[:1], False) for c in cuts[rank]]
            micro_batches += [MicroBatch(mini[:1], False)] * (n_micro - len(micro_batches))
            if loss_agg == "token_mean":
                normalizer = float(sum(trained_tokens[i] for i in mini))
            else:
                normalizer = float(sum(1 for i in mini if trained_tokens[i] > 0))
            plan.append(MiniBatch(mini, micro_batches, normalizer, float(sum(value_tokens[i] for i in mini))))
    return plan


def _micro_batches(mine: list[int], train: Train, layout: PromptLayout | None) -> list[list[int]]:
    """One process's share of a mini-batch cut into micro-batches (at least one, possibly empty)."""
    if layout is not None and layout.group_by_prompt:
        first: dict[Hashable, int] = {}
        for i in mine:
            first.setdefault(layout.keys[i], len(first))
        mine = sorted(mine, key=lambda i: first[layout.keys[i]])
    budget = train.max_tokens_per_micro_batch
    if budget is None:
        micro = train.per_device_train_batch_size
        return [mine[k : k + micro] for k in range(0, len(mine), micro)] or [[]]
    if layout is None:
        raise ValueError("train.max_tokens_per_micro_batch needs the episodes' prompt layout")
    cuts: list[list[int]] = [[]]
    prompts: set[Hashable] = set()
    used = 0
    for i in mine:
        # What the episode adds to `pack`'s rows: its response, and its prompt unless a neighbour brought it.
        cost = layout.response_lengths[i] + (0 if layout.keys[i] in prompts else layout.prompt_lengths[i])
        if cuts[-1] and used + cost > budget:
            cuts.append([])
            prompts, used = set(), 0
            cost = layout.response_lengths[i] + layout.prompt_lengths[i]
        cuts[-1].append(i)
        prompts.add(layout.keys[i])
        used += cost
    return cuts


def _train_micro_batch(
    learner: Learner, inputs: UpdateInputs, mini: MiniBatch, micro: MicroBatch, *, last: bool, loss: PpoClip,
    temperature: float, runtime: Runtime, pad_id: int, critic: ValueCritic | None, sums: UpdateSums,
) -> None:  # fmt: skip
    """Forward and backward one micro-batch (policy loss, and the critic's value loss with a critic) and add its
    metrics to `sums` (a filler's are not added)."""
    episodes = [inputs.episodes[i] for i in micro.indices]
    prompts, responses = [ep.prompt_token_ids for ep in episodes], [ep.response_token_ids for ep in episodes]
    with learner.micro_batch(last=last):
        batch = pack(prompts, responses, pad_id, shared_prompts=shares_prompts(learner.model)).to(runtime.device)
        with runtime.autocast():
            logprobs, entropy = packed_logprobs(learner.model, batch, temperature, with_entropy=True)
        # The policy's tokens only: a tool's output is neither trained nor counted in the entropy.
        mask = batch.response_mask
        if any(ep.tool_spans for ep in episodes):
            mask = mask * batch.scatter([policy_token_mask(ep) for ep in episodes])
        out = _policy_loss(batch, logprobs, mask, inputs, micro.indices, mini, loss)
        skipped = loss.skip_ratio_above is not None and out.metrics["ratio_mean"] > loss.skip_ratio_above
        # The reference drops a micro-batch whose policy has drifted too far (ratio explosion)
        # but still runs backward, so every rank does the same collective work.
        total = out.loss * 0.0 if skipped or not micro.real else out.loss
        value_metrics = None
        if critic is not None:
            value_batch = collate(prompts, responses, pad_id).to(runtime.device)
            value_loss, value_metrics = critic_loss(critic, value_batch, episodes, mini.value_normalizer, runtime)
            total = total + critic.vf_coef * value_loss * float(micro.real)
        # DDP and DeepSpeed average gradients over processes; each share is normalised by the whole
        # mini-batch, so the sum over processes is the loss: undo the average.
        learner.backward(total * learner.cluster.world_size)
    if micro.real:
        sums.add(out, value_metrics, skipped, entropy, mask)


def _policy_loss(
    batch, logprobs, mask, inputs: UpdateInputs, indices: list[int], mini: MiniBatch, loss: PpoClip
) -> LossOutputs:
    """PPO-clip of one micro-batch over the tokens of `mask`: its advantages (whitened if asked), pi_old and
    reference log-probs laid out like `logprobs`."""
    adv = batch.scatter([inputs.advantages[i] for i in indices])
    old = batch.scatter([inputs.episodes[i].response_logprobs for i in indices])
    rho = inputs.rho
    if loss.whiten_advantages:
        keep = mask if rho is None else mask * (old.exp() < rho)
        adv = masked_whiten(adv, keep)
    ref = batch.scatter([inputs.ref_logprobs[i] for i in indices]) if inputs.ref_logprobs is not None else None
    return ppo_clip_loss(
        LossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref),
        epsilon_low=loss.epsilon,
        epsilon_high=loss.epsilon_high if loss.epsilon_high is not None else loss.epsilon,
        beta=loss.beta,
        prob_mask_rho=rho,
        loss_agg=loss.loss_agg,
        kl_agg=loss.kl_agg,
        normalizer=mini.normalizer,
        kl_normalizer=float(len(mini.indices)),
        clip_ratio_c=loss.clip_ratio_c,
    )


class UpdateSums:
    """Metric sums of one update over the real micro-batches of this process; `weights` holds the denominators of
    the keys averaged per token."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.grad_norm = 0.0
        self.value_grad_norm = 0.0

    def add(self, out: LossOutputs, value_metrics: dict[str, float] | None, skipped: bool, entropy, mask) -> None:
        sums, weights = self.sums, self.weights
        if value_metrics is not None:
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
        sums["entropy"] += float((entropy * mask).sum())
        weights["entropy"] += float(mask.sum())


def update_metrics(
    acc: UpdateSums, steps: int, trained: int, learning_rate: float, cluster, with_critic: bool
) -> dict[str, float]:
    """The update's metrics, summed over processes: token-weighted means, and per-step means of the losses
    (micro-batch losses add up to the step's loss) and gradient norms."""
    sums = cluster.sum_floats(acc.sums)
    weights = cluster.sum_floats(acc.weights)
    metrics = {k: sums[k] / weights[k] for k in sums if weights.get(k, 0.0) > 0}
    metrics["skipped_micro_batches"] = sums.get("skipped_micro_batches", 0.0)
    metrics["policy_loss"] = sums.get("policy_loss", 0.0) / steps
    metrics["grad_norm"] = acc.grad_norm / steps
    metrics["kl"] = sums.get("kl", 0.0) / steps
    if with_critic:
        metrics["value_loss"] = sums.get("value_loss", 0.0) / steps
        metrics["value_grad_norm"] = acc.value_grad_norm / steps
    metrics["optimizer_steps"] = float(steps)
    metrics["trained_episodes"] = float(trained)
    metrics["learning_rate"] = learning_rate
    return metrics


def _check_update_inputs(episodes: Sequence[Episode], critic: ValueCritic | None) -> None:
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


def _reference_logprobs(
    ref_model, episodes: Sequence[Episode], cluster, train: Train, temperature: float, runtime: Runtime, pad_id: int,
    beta: float,
) -> list[list[float]] | None:  # fmt: skip
    """The reference model's log-probs of every episode's response (each process scores its share), when the loss
    has a KL term (`beta` > 0)."""
    if beta <= 0:
        return None

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

    return cluster.map_shards(score_reference, episodes)
