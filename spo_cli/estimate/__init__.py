"""Estimate stage: fill segment advantages. `estimate_advantages` maps `estimator.kind` to code.

Kept free of torch imports: estimators that need a policy (Monte Carlo rollouts) receive it as a
callable built by the caller (`spo_cli.estimate.rollout`).
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode, Segment
from spo_cli.estimate.chain import chain_segment_advantages, chain_token_advantages
from spo_cli.estimate.group import group_advantages
from spo_cli.estimate.mc_chain import StateValues, ValueState, estimate_mc_chain
from spo_cli.recipe import EstimatorSpec, Group, McChain

__all__ = [
    "StateValues",
    "ValueState",
    "chain_segment_advantages",
    "chain_token_advantages",
    "estimate_advantages",
    "group_advantages",
    "needs_policy",
]


def needs_policy(spec: EstimatorSpec) -> bool:
    """Whether the estimator samples from the policy (and so needs `state_values`)."""
    return isinstance(spec, McChain)


def estimate_advantages(
    episodes: Sequence[Episode], spec: EstimatorSpec, state_values: StateValues | None = None
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` whose segments carry advantages, and the estimator's metrics."""
    for ep in episodes:
        if ep.segments is None:
            raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
        if ep.reward is None:
            raise ValueError(f"episode {ep.id} has no reward")
    match spec:
        case Group():
            adv = group_advantages(
                [ep.reward for ep in episodes], [ep.group_id for ep in episodes], spec.scale_by_std, spec.eps
            )
            return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)], {}
        case McChain():
            if state_values is None:
                raise ValueError("estimator.kind=mc_chain samples continuations: it needs the policy")
            missing = next((ep.id for ep in episodes if ep.gold is None), None)
            if missing is not None:
                raise ValueError(f"episode {missing} has no gold answer: mc_chain grades its rollouts against it")
            return estimate_mc_chain(episodes, state_values, spec.zero_advantage_above)
    raise AssertionError(f"unhandled estimator kind {spec.kind!r}")


def _with_constant_advantage(ep: Episode, advantage: float) -> Episode:
    segments = [s.model_copy(update={"advantage": advantage}) for s in ep.segments]
    return ep.model_copy(update={"segments": segments, "token_advantages": None})
