"""VinePPO's estimator (docs/algorithms.md#vineppo): Monte Carlo values at the prompt and after each step.

Step k of a response (k = 0..n-1) is a segment; V_k is the value of the state before step k (V_0 is the
prompt's) and V_n = 0 is the terminal value. The step reward r_k is the episode's reward on the last
step and 0 before it, so A_k = r_k + V_k+1 - V_k. Only the first `max_estimated_steps` + 1 states are
sampled; the rest are back-filled from the end as r_k + V_k+1 (which makes them the reward itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.episode import Episode
from spo_cli.estimate.mc_chain import StateValues, ValueState, state_before, value_states


def estimated_step_states(num_steps: int, max_estimated_steps: int) -> int:
    """How many of the states V_0..V_n-1 are Monte Carlo estimated: the prompt and after each step k for
    k <= min(n - 2, max_estimated_steps - 1), i.e. min(n, max_estimated_steps + 1) states (0 for n = 0)."""
    return min(num_steps, max_estimated_steps + 1)


def vineppo_step_advantages(values: Sequence[float | None], reward: float) -> tuple[list[float], list[float]]:
    """Step advantages from the values of the states before each step.

    Args:
        values: [n] V_k, the value before step k, or None where it was not estimated.
        reward: the episode's reward, earned on the last step.

    Returns:
        ([n] advantages A_k = r_k + V_k+1 - V_k, [n] values with the gaps back-filled as r_k + V_k+1).

    Example: values [0.5, None, None], reward 1 -> back-filled [0.5, 1, 1], advantages [0.5, 0, 0].
    """
    n = len(values)
    filled: list[float] = [0.0] * n
    advantages: list[float] = [0.0] * n
    next_value = 0.0  # the terminal state
    for k in range(n - 1, -1, -1):
        r_k = reward if k == n - 1 else 0.0
        v = values[k]
        filled[k] = r_k + next_value if v is None else v
        advantages[k] = r_k + next_value - filled[k]
        next_value = filled[k]
    return advantages, filled


def estimate_vineppo(
    episodes: Sequence[Episode], state_values: StateValues, max_estimated_steps: int
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` (every segment a step) with step advantages, and work counts."""
    per_episode: list[list[ValueState]] = []
    for ep in episodes:
        if ep.reward is None:
            raise ValueError(f"episode {ep.id} has no reward")
        estimated = estimated_step_states(len(ep.segments), max_estimated_steps)
        per_episode.append([state_before(ep, seg.start) for seg in ep.segments[:estimated]])
    values, unique = value_states(per_episode, state_values)
    out = []
    for ep, states in zip(episodes, per_episode):
        sampled: list[float | None] = [values[s] for s in states]
        sampled += [None] * (len(ep.segments) - len(states))
        advantages, filled = vineppo_step_advantages(sampled, ep.reward)
        segments = [
            seg.model_copy(update={"advantage": a, "value": v, "is_boundary": True})
            for seg, a, v in zip(ep.segments, advantages, filled)
        ]
        out.append(ep.model_copy(update={"segments": segments, "token_advantages": None}))
    total = sum(len(states) for states in per_episode)
    return out, {"mc/states": float(total), "mc/unique_states": float(unique)}
