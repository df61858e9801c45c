"""Partition stage: cut each response into segments. `boundaries_for` maps `partitioner.kind` to code.

A partitioner yields, per response, the ascending response-token indices that open a segment (its
"boundaries"); the state before each boundary is where estimators measure a value. Segments follow
from them (`segments_from_boundaries`): each boundary opens one, and a response whose first boundary
is past token 0 keeps a leading region with no value state (SPO-chain's tokens before the first
cutpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode, Segment
from spo_cli.partition.cutpoint import cutpoint_boundaries
from spo_cli.partition.entropy import entropy_boundaries
from spo_cli.partition.fixed_count import fixed_count_boundaries
from spo_cli.partition.fixed_tokens import fixed_tokens_boundaries
from spo_cli.partition.spans import off_tool_spans, segments_from_boundaries
from spo_cli.partition.step import step_boundaries, step_char_starts
from spo_cli.partition.whole import whole_boundaries
from spo_cli.recipe import Cutpoint, Entropy, FixedCount, FixedTokens, PartitionerSpec, Step, Whole

__all__ = [
    "boundaries_for",
    "cutpoint_boundaries",
    "entropy_boundaries",
    "fixed_count_boundaries",
    "fixed_tokens_boundaries",
    "needs_logprobs",
    "partition_episodes",
    "segments_from_boundaries",
    "step_boundaries",
    "step_char_starts",
    "whole_boundaries",
]


def needs_logprobs(spec: PartitionerSpec) -> bool:
    """Whether the partitioner reads per-token sampling statistics (log-probs or entropies)."""
    return isinstance(spec, Cutpoint | Entropy)


def boundaries_for(episodes: Sequence[Episode], spec: PartitionerSpec, tokenizer=None) -> list[list[int]]:
    """The boundaries of every episode's response under `spec`, none inside a tool's output."""
    found = _boundaries_of_kind(episodes, spec, tokenizer)
    return [
        off_tool_spans(bounds, ep.tool_spans, len(ep.response_token_ids)) if ep.tool_spans else bounds
        for ep, bounds in zip(episodes, found)
    ]


def _boundaries_of_kind(episodes: Sequence[Episode], spec: PartitionerSpec, tokenizer=None) -> list[list[int]]:
    """The boundaries `spec` finds in every episode's response (the one place a kind maps to code)."""
    lengths = [len(ep.response_token_ids) for ep in episodes]
    match spec:
        case Whole():
            return [whole_boundaries(n) for n in lengths]
        case Cutpoint():
            return [cutpoint_boundaries(_logprobs(ep), spec.rho, spec.interval) for ep in episodes]
        case FixedCount():
            return [fixed_count_boundaries(n, spec.num_segments) for n in lengths]
        case FixedTokens():
            return [fixed_tokens_boundaries(n, spec.segment_tokens) for n in lengths]
        case Step():
            if tokenizer is None:
                raise ValueError("partitioner.kind=step needs the tokenizer (token -> character offsets)")
            return [_step_boundaries(ep, tokenizer) for ep in episodes]
        case Entropy():
            return entropy_boundaries(
                [_entropies(ep) for ep in episodes],
                spec.percentile,
                spec.scope,
                spec.min_segment_length,
                spec.max_segments,
            )
    raise AssertionError(f"unhandled partitioner kind {spec.kind!r}")


def partition_episodes(episodes: Sequence[Episode], spec: PartitionerSpec, tokenizer=None) -> list[Episode]:
    """Copies of `episodes` with `segments` set (advantages and token advantages empty)."""
    out = []
    for ep, bounds in zip(episodes, boundaries_for(episodes, spec, tokenizer)):
        spans = segments_from_boundaries(bounds, len(ep.response_token_ids))
        segments = [Segment(start=s, end=e, is_boundary=b) for s, e, b in spans]
        out.append(ep.model_copy(update={"segments": segments, "token_advantages": None}))
    return out


def _logprobs(ep: Episode) -> list[float]:
    if ep.response_logprobs is None:
        raise ValueError(f"episode {ep.id} has no response_logprobs (the cutpoint partitioner needs them)")
    return ep.response_logprobs


def _entropies(ep: Episode) -> list[float]:
    if ep.response_entropies is None:
        raise ValueError(f"episode {ep.id} has no response_entropies (the entropy partitioner needs them)")
    return ep.response_entropies


def _step_boundaries(ep: Episode, tokenizer) -> list[int]:
    ids = ep.response_token_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return step_boundaries(
        step_char_starts(text), lambda t: len(tokenizer.decode(ids[:t], skip_special_tokens=True)), len(ids)
    )
