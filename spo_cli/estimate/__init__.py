"""Estimate stage: fill segment advantages. `estimate_advantages` maps `estimator.kind` to code.

Kept free of torch imports, so episode files can be estimated without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode, Segment
from spo_cli.estimate.group import group_advantages
from spo_cli.recipe import EstimatorSpec, Group

__all__ = ["estimate_advantages", "group_advantages"]


def estimate_advantages(episodes: Sequence[Episode], spec: EstimatorSpec) -> list[Episode]:
    """Copies of partitioned `episodes` whose segments carry advantages."""
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
            return [_with_constant_advantage(ep, a) for ep, a in zip(episodes, adv)]
    raise AssertionError(f"unhandled estimator kind {spec.kind!r}")


def _with_constant_advantage(ep: Episode, advantage: float) -> Episode:
    segments = [Segment(start=s.start, end=s.end, advantage=advantage, value=s.value) for s in ep.segments]
    return ep.model_copy(update={"segments": segments})
