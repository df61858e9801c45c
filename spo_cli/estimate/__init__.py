"""Estimate stage: fill segment advantages. `estimate_advantages` maps `estimator.kind` to code.

Kept free of torch imports: estimators that need a policy (Monte Carlo rollouts) receive it as a
callable built by the caller (`spo_cli.estimate.rollout`); likewise the critic's values for gae
(`spo_cli.critic`).
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode
from spo_cli.estimate.chain import chain_segment_advantages, chain_token_advantages
from spo_cli.estimate.gae import CriticValues, estimate_gae, gae_advantages
from spo_cli.estimate.group import group_advantages, rloo_advantages
from spo_cli.estimate.mc_chain import StateValues, ValueState, estimate_mc_chain
from spo_cli.estimate.mc_tree import estimate_mc_tree
from spo_cli.estimate.segment_gae import (
    estimate_segment_gae,
    estimate_segment_gae_fallback,
    segment_gae,
    segment_value_targets,
    spread_over_tokens,
    whiten_tokens,
)
from spo_cli.estimate.single_stream import estimate_single_stream, single_stream_advantages
from spo_cli.estimate.tree import tree_edge_advantages, tree_values
from spo_cli.estimate.vineppo import estimate_vineppo, vineppo_step_advantages
from spo_cli.recipe import EstimatorSpec, Gae, Group, McChain, McTree, Rloo, SegmentGae, SingleStream, Vineppo

__all__ = [
    "CriticValues",
    "StateValues",
    "ValueState",
    "chain_segment_advantages",
    "chain_token_advantages",
    "estimate_advantages",
    "gae_advantages",
    "group_advantages",
    "rloo_advantages",
    "needs_critic",
    "needs_policy",
    "segment_gae",
    "segment_value_targets",
    "single_stream_advantages",
    "spread_over_tokens",
    "tree_edge_advantages",
    "tree_values",
    "vineppo_step_advantages",
    "whiten_tokens",
]


def needs_policy(spec: EstimatorSpec) -> bool:
    """Whether the estimator samples rollouts from the policy (and so needs `state_values`).

    mc_tree samples too, but its sampling is the tree expansion that produces the episodes it reads.
    """
    return isinstance(spec, (McChain, Vineppo))


def needs_critic(spec: EstimatorSpec) -> bool:
    """Whether the estimator reads a value network's estimates (and so needs `critic_values`).

    segment_gae without a critic (`critic: null`) falls back to group-mean baselines and reads none.
    """
    return isinstance(spec, Gae) or (isinstance(spec, SegmentGae) and spec.critic is not None)


def estimate_advantages(
    episodes: Sequence[Episode],
    spec: EstimatorSpec,
    state_values: StateValues | None = None,
    critic_values: CriticValues | None = None,
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` whose segments carry advantages, and the estimator's metrics.

    mc_tree reads the node episodes of whole trees and returns only its training episodes: the edges with a
    non-zero advantage.
    """
    for ep in episodes:
        if ep.segments is None:
            raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
        # Tree episodes are nodes: only leaves have a reward.
        if ep.reward is None and not isinstance(spec, McTree):
            raise ValueError(f"episode {ep.id} has no reward")
    match spec:
        case Group():
            adv = group_advantages(
                [ep.reward for ep in episodes], [ep.group_id for ep in episodes], spec.scale_by_std, spec.eps
            )
            return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)], {}
        case Rloo():
            adv = rloo_advantages([ep.reward for ep in episodes], [ep.group_id for ep in episodes])
            return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)], {}
        case McChain():
            _check_rollouts(episodes, spec.kind, state_values)
            return _counting_rollouts(state_values, lambda: estimate_mc_chain(episodes, state_values, spec.zero_advantage_above))
        case Vineppo():
            _check_rollouts(episodes, spec.kind, state_values)
            return _counting_rollouts(state_values, lambda: estimate_vineppo(episodes, state_values, spec.max_estimated_steps))
        case McTree():
            return estimate_mc_tree(episodes, spec.normalize_std, spec.eps)
        case Gae():
            if critic_values is None:
                raise ValueError("estimator.kind=gae reads a value network's estimates: it needs the critic")
            return estimate_gae(episodes, critic_values(episodes), spec.gamma, spec.lam)
        case SegmentGae(critic=None):
            return estimate_segment_gae_fallback(
                episodes, spec.fallback_scale_by_std, spec.normalize_advantages, spec.eps
            )
        case SegmentGae():
            if critic_values is None:
                raise ValueError(
                    "estimator.kind=segment_gae reads a value network's estimates: it needs the critic "
                    "(or estimator.critic: null for the group-mean fallback)"
                )
            return estimate_segment_gae(
                episodes,
                critic_values(episodes),
                spec.gamma,
                spec.lam,
                spec.value_loss_positions,
                spec.normalize_advantages,
                spec.eps,
            )
        case SingleStream():
            return estimate_single_stream(episodes, spec.adv_norm, spec.baseline, spec.eps)
    raise AssertionError(f"unhandled estimator kind {spec.kind!r}")


def _counting_rollouts(state_values, estimate) -> tuple[list[Episode], dict[str, float]]:
    """`estimate()`'s result, its metrics with "mc/generated_tokens": the tokens its rollouts sampled (where the
    value callable counts them)."""
    before = getattr(state_values, "generated_tokens", None)
    episodes, stats = estimate()
    if before is None:
        return episodes, stats
    return episodes, {**stats, "mc/generated_tokens": float(state_values.generated_tokens - before)}


def _check_rollouts(episodes: Sequence[Episode], kind: str, state_values: StateValues | None) -> None:
    """Monte Carlo estimators sample continuations with the policy and grade them against the gold answer."""
    if state_values is None:
        raise ValueError(f"estimator.kind={kind} samples continuations: it needs the policy")
    missing = next((ep.id for ep in episodes if ep.gold is None), None)
    if missing is not None:
        raise ValueError(f"episode {missing} has no gold answer: {kind} grades its rollouts against it")


def _with_constant_advantage(ep: Episode, advantage: float) -> Episode:
    segments = [s.model_copy(update={"advantage": advantage}) for s in ep.segments]
    return ep.model_copy(update={"segments": segments, "token_advantages": None})
