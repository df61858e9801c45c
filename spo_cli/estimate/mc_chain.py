"""SPO-chain's estimator: Monte Carlo values of the states before segment boundaries, chain advantages.

The estimator only decides which states need a value and turns values into advantages; sampling the
continuations is the `StateValues` callable's job (`spo_cli.estimate.rollout`), so this module needs
neither torch nor a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spo_cli.episode import Episode, Segment
from spo_cli.estimate.chain import chain_segment_advantages, chain_token_advantages


@dataclass(frozen=True)
class ValueState:
    """A partial response whose expected final reward is wanted: prompt + the response tokens before a boundary."""

    iteration: int  # the policy version that sampled it (states of different policies are never merged)
    prompt_token_ids: tuple[int, ...]
    prefix_token_ids: tuple[int, ...]
    gold: str | None
    tool_calls: int = 0  # the tool calls the prefix made: its rollouts get only the calls left (docs/tools.md)


def state_before(episode: Episode, boundary: int) -> ValueState:
    """The state of `episode` before response token `boundary`, with the tool calls made before it."""
    calls = sum(1 for start, _ in episode.tool_spans if start < boundary)
    prefix = tuple(episode.response_token_ids[:boundary])
    return ValueState(episode.iteration, tuple(episode.prompt_token_ids), prefix, episode.gold, calls)


# (states of one iteration, iteration) -> one value per state
StateValues = Callable[[Sequence[ValueState], int], list[float]]


def boundary_states(episode: Episode) -> tuple[list[int], list[ValueState]]:
    """The boundaries of a partitioned episode and the state before each."""
    if episode.segments is None:
        raise ValueError(f"episode {episode.id} has no segments: run the partition stage first")
    boundaries = [seg.start for seg in episode.segments if seg.is_boundary]
    return boundaries, [state_before(episode, b) for b in boundaries]


def value_states(
    per_episode: Sequence[Sequence[ValueState]], state_values: StateValues
) -> tuple[dict[ValueState, float], int]:
    """The value of every distinct state (and how many there were), one `state_values` call per iteration.

    States repeat (the prompt state of a group's responses, responses that share a prefix) and are valued
    once; they are sent in first-appearance order, so the same episodes always get the same rollouts for
    the same seed.
    """
    unique: dict[ValueState, None] = {}
    for states in per_episode:
        unique.update(dict.fromkeys(states))
    by_iteration: dict[int, list[ValueState]] = {}
    for state in unique:
        by_iteration.setdefault(state.iteration, []).append(state)
    values: dict[ValueState, float] = {}
    for iteration, states in by_iteration.items():
        values.update(zip(states, state_values(states, iteration)))
    return values, len(unique)


def estimate_mc_chain(
    episodes: Sequence[Episode], state_values: StateValues, zero_advantage_above: float | None
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` with chain advantages, and counts of the work done."""
    per_episode = [boundary_states(ep) for ep in episodes]
    values, unique = value_states([states for _, states in per_episode], state_values)

    out = []
    for ep, (boundaries, states) in zip(episodes, per_episode):
        if ep.reward is None:
            raise ValueError(f"episode {ep.id} has no reward")
        if ep.response_logprobs is None and zero_advantage_above is not None:
            raise ValueError(f"episode {ep.id} has no response_logprobs (needed to zero high-probability tokens)")
        state_value = [values[s] for s in states]
        segment_adv = iter(chain_segment_advantages(boundaries, state_value, ep.reward))
        start_value = iter(state_value)
        segments = [
            Segment(start=s.start, end=s.end, advantage=next(segment_adv), value=next(start_value), is_boundary=True)
            if s.is_boundary
            else Segment(start=s.start, end=s.end, advantage=0.0, is_boundary=False)
            for s in ep.segments
        ]
        logprobs = ep.response_logprobs or [0.0] * len(ep.response_token_ids)
        tokens = chain_token_advantages(logprobs, boundaries, state_value, ep.reward, rho=zero_advantage_above)
        out.append(ep.model_copy(update={"segments": segments, "token_advantages": tokens}))
    total = sum(len(states) for _, states in per_episode)
    return out, {"mc/states": float(total), "mc/unique_states": float(unique)}
