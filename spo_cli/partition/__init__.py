"""Partition stage: cut each response into segments. `build_partitioner` maps `partition.kind` to code."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spo_cli.episode import Episode, Segment
from spo_cli.recipe import PartitionSpec, Whole

# episode -> half-open (start, end) response-token spans covering the response
Partitioner = Callable[[Episode], list[tuple[int, int]]]


def build_partitioner(spec: PartitionSpec) -> Partitioner:
    match spec:
        case Whole():
            from spo_cli.partition.whole import whole_boundaries

            return lambda ep: whole_boundaries(len(ep.response_token_ids))
    raise AssertionError(f"unhandled partition kind {spec.kind!r}")


def partition_episodes(episodes: Sequence[Episode], partitioner: Partitioner) -> list[Episode]:
    """Copies of `episodes` with `segments` set (advantages empty)."""
    return [
        ep.model_copy(update={"segments": [Segment(start=s, end=e) for s, e in partitioner(ep)]}) for ep in episodes
    ]
