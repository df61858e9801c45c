"""Estimate stage: fill segment advantages. `ESTIMATORS` (below, in `spo_cli.estimate.registry`) maps each
`estimator.kind` to its code: the estimate function, and the method object the training loop drives
(`spo_cli.estimate.method`; stateless estimators get `PlainMethod`).

Kept free of torch imports: estimators that need a policy (Monte Carlo rollouts) receive it as a callable built
by the caller (`spo_cli.estimate.rollout`); likewise the critic's values (`spo_cli.estimate.critic`).
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode
from spo_cli.estimate.chain import chain_segment_advantages, chain_token_advantages
from spo_cli.estimate.critic.method import critic_method
from spo_cli.estimate.gae import CriticValues, estimate_gae, gae_advantages
from spo_cli.estimate.group import group_advantages, rloo_advantages
from spo_cli.estimate.mc_chain import StateValues, ValueState, estimate_mc_chain
from spo_cli.estimate.registry import (
    ESTIMATORS, EstimateInputs, EstimatorEntry, always, estimate_advantages, estimator_entry, register_estimator,
)  # fmt: skip
from spo_cli.estimate.segment_gae import (
    estimate_segment_gae,
    estimate_segment_gae_fallback,
    segment_gae,
    segment_value_targets,
    spread_over_tokens,
    whiten_tokens,
)
from spo_cli.estimate.single_stream.advantages import estimate_single_stream, single_stream_advantages
from spo_cli.estimate.single_stream.method import SingleStreamMethod
from spo_cli.estimate.tree.growth import estimate_mc_tree
from spo_cli.estimate.tree.method import TreeMethod
from spo_cli.estimate.tree.values import tree_edge_advantages, tree_values
from spo_cli.estimate.vineppo import estimate_vineppo, vineppo_step_advantages
from spo_cli.recipe import EstimatorSpec, Gae, Group, McChain, McTree, Rloo, SegmentGae, SingleStream, Vineppo

__all__ = [
    "ESTIMATORS",
    "CriticValues",
    "EstimateInputs",
    "EstimatorEntry",
    "StateValues",
    "ValueState",
    "chain_segment_advantages",
    "chain_token_advantages",
    "estimate_advantages",
    "estimator_entry",
    "gae_advantages",
    "group_advantages",
    "rloo_advantages",
    "needs_critic",
    "needs_policy",
    "register_estimator",
    "segment_gae",
    "segment_value_targets",
    "single_stream_advantages",
    "spread_over_tokens",
    "tree_edge_advantages",
    "tree_values",
    "vineppo_step_advantages",
    "whiten_tokens",
]


def _group(episodes: Sequence[Episode], spec: Group, inputs: EstimateInputs):
    adv = group_advantages([ep.reward for ep in episodes], [ep.group_id for ep in episodes], spec.scale_by_std, spec.eps)
    return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)], {}


def _rloo(episodes: Sequence[Episode], spec: Rloo, inputs: EstimateInputs):
    adv = rloo_advantages([ep.reward for ep in episodes], [ep.group_id for ep in episodes])
    return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)], {}


def _mc_chain(episodes: Sequence[Episode], spec: McChain, inputs: EstimateInputs):
    values = _check_rollouts(episodes, spec.kind, inputs.state_values)
    return _counting_rollouts(values, lambda: estimate_mc_chain(episodes, values, spec.zero_advantage_above))


def _vineppo(episodes: Sequence[Episode], spec: Vineppo, inputs: EstimateInputs):
    values = _check_rollouts(episodes, spec.kind, inputs.state_values)
    return _counting_rollouts(values, lambda: estimate_vineppo(episodes, values, spec.max_estimated_steps))


def _mc_tree(episodes: Sequence[Episode], spec: McTree, inputs: EstimateInputs):
    return estimate_mc_tree(episodes, spec.normalize_std, spec.eps)


def _gae(episodes: Sequence[Episode], spec: Gae, inputs: EstimateInputs):
    if inputs.critic_values is None:
        raise ValueError("estimator.kind=gae reads a value network's estimates: it needs the critic")
    return estimate_gae(episodes, inputs.critic_values(episodes), spec.gamma, spec.lam)


def _segment_gae(episodes: Sequence[Episode], spec: SegmentGae, inputs: EstimateInputs):
    if spec.critic is None:
        return estimate_segment_gae_fallback(episodes, spec.fallback_scale_by_std, spec.normalize_advantages, spec.eps)
    if inputs.critic_values is None:
        raise ValueError(
            "estimator.kind=segment_gae reads a value network's estimates: it needs the critic "
            "(or estimator.critic: null for the group-mean fallback)"
        )
    values = inputs.critic_values(episodes)
    return estimate_segment_gae(
        episodes, values, spec.gamma, spec.lam, spec.value_loss_positions, spec.normalize_advantages, spec.eps
    )


def _single_stream(episodes: Sequence[Episode], spec: SingleStream, inputs: EstimateInputs):
    return estimate_single_stream(episodes, spec.adv_norm, spec.baseline, spec.eps)


def _has_critic(spec: Gae | SegmentGae) -> bool:
    return spec.critic is not None


# The one place an estimator.kind maps to code. A new estimator: one module and one line here (or a
# `register_estimator` call of its own); docs/extending.md.
for _entry in (
    EstimatorEntry(Group, _group),
    EstimatorEntry(Rloo, _rloo),
    EstimatorEntry(McChain, _mc_chain, samples_rollouts=always),
    EstimatorEntry(Vineppo, _vineppo, samples_rollouts=always),
    EstimatorEntry(McTree, _mc_tree, method=TreeMethod, requires_rewards=False),
    EstimatorEntry(Gae, _gae, method=critic_method, reads_critic=_has_critic),
    EstimatorEntry(SegmentGae, _segment_gae, method=critic_method, reads_critic=_has_critic),
    EstimatorEntry(SingleStream, _single_stream, method=SingleStreamMethod),
):
    register_estimator(_entry)


def needs_policy(spec: EstimatorSpec) -> bool:
    """Whether the estimator samples rollouts from the policy (and so needs `state_values`).

    mc_tree samples too, but its sampling is the tree expansion that produces the episodes it reads.
    """
    return estimator_entry(spec).samples_rollouts(spec)


def needs_critic(spec: EstimatorSpec) -> bool:
    """Whether the estimator reads a value network's estimates (and so needs `critic_values`).

    segment_gae without a critic (`critic: null`) falls back to group-mean baselines and reads none.
    """
    return estimator_entry(spec).reads_critic(spec)


def _counting_rollouts(state_values, estimate) -> tuple[list[Episode], dict[str, float]]:
    """`estimate()`'s result, its metrics with "mc/generated_tokens": the tokens its rollouts sampled (where the
    value callable counts them)."""
    before = getattr(state_values, "generated_tokens", None)
    episodes, stats = estimate()
    if before is None:
        return episodes, stats
    return episodes, {**stats, "mc/generated_tokens": float(state_values.generated_tokens - before)}


def _check_rollouts(episodes: Sequence[Episode], kind: str, state_values: StateValues | None) -> StateValues:
    """Monte Carlo estimators sample continuations with the policy and grade them against the gold answer."""
    if state_values is None:
        raise ValueError(f"estimator.kind={kind} samples continuations: it needs the policy")
    missing = next((ep.id for ep in episodes if ep.gold is None), None)
    if missing is not None:
        raise ValueError(f"episode {missing} has no gold answer: {kind} grades its rollouts against it")
    return state_values


def _with_constant_advantage(ep: Episode, advantage: float) -> Episode:
    segments = [s.model_copy(update={"advantage": advantage}) for s in ep.segments]
    return ep.model_copy(update={"segments": segments, "token_advantages": None})
