"""PPO with a critic: generalized advantage estimation (GAE) from a value network's estimates.

`gae_advantages` is the math over a generic sequence of steps (response tokens here; segments for a
per-segment GAE later). `estimate_gae` applies it per token to episodes whose critic values were computed
by the caller (`spo_cli.estimate.critic.model`), so this module needs neither torch nor a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spo_cli.episode import Episode

# episodes -> the critic's value of the state before each response token, one list per episode
CriticValues = Callable[[Sequence[Episode]], list[list[float]]]


def gae_advantages(
    rewards: Sequence[float], values: Sequence[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """GAE advantages and value targets of one trajectory of K steps.

    With V_K = 0 (nothing follows the last step, so nothing is bootstrapped)::

        delta_k = r_k + gamma * V_{k+1} - V_k
        A_k     = delta_k + gamma * lam * A_{k+1}      (A_K = 0)
        G_k     = A_k + V_k

    Args:
        rewards: [K] reward received on each step (an outcome reward sits on the last one).
        values: [K] value of the state before each step.
        gamma: discount per step.
        lam: GAE lambda; 1 gives Monte Carlo returns G_k, 0 one-step TD.

    Returns:
        (advantages [K], returns [K]); both empty for K = 0.
    """
    if len(rewards) != len(values):
        raise ValueError(f"{len(rewards)} rewards but {len(values)} values")
    advantages = [0.0] * len(rewards)
    next_value, next_advantage = 0.0, 0.0
    for k in reversed(range(len(rewards))):
        delta = rewards[k] + gamma * next_value - values[k]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[k] = next_advantage
        next_value = values[k]
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


def explained_variance(predictions: Sequence[float], targets: Sequence[float], eps: float = 1e-5) -> float:
    """1 - Var(targets - predictions) / (Var(targets) + eps), population variances (verl's vf_explained_var).

    1 is a perfect critic, 0 one no better than a constant, negative one worse than a constant.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not targets:
        return 0.0
    return 1.0 - _variance([t - p for p, t in zip(predictions, targets)]) / (_variance(targets) + eps)


def estimate_gae(
    episodes: Sequence[Episode], values_per_episode: Sequence[Sequence[float]], gamma: float, lam: float
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` with token-level GAE advantages and value targets, and critic metrics.

    Each episode's outcome reward is the reward of its last response token (0 on the others). Every token
    gets its own advantage (`token_advantages`), `response_values` (V_old of the clipped value loss) and a
    value target (its return). Segments are informational here: a segment's advantage is that of its first
    token and its value is V at its start.

    Args:
        episodes: N partitioned episodes with rewards.
        values_per_episode: N lists, the critic's value before each response token of the episode.
        gamma: discount per token.
        lam: GAE lambda.
    """
    if len(values_per_episode) != len(episodes):
        raise ValueError(f"{len(values_per_episode)} value lists for {len(episodes)} episodes")
    out = []
    all_values, all_returns, all_advantages = [], [], []
    for ep, values in zip(episodes, values_per_episode):
        n = len(ep.response_token_ids)
        if len(values) != n:
            raise ValueError(f"episode {ep.id}: {len(values)} critic values for {n} response tokens")
        if ep.segments is None:
            raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
        rewards = [0.0] * n
        if n:
            rewards[-1] = ep.reward
        values = [float(v) for v in values]
        advantages, returns = gae_advantages(rewards, values, gamma, lam)
        segments = [
            s.model_copy(update={"advantage": advantages[s.start], "value": values[s.start]}) for s in ep.segments
        ]
        out.append(
            ep.model_copy(
                update={
                    "segments": segments,
                    "token_advantages": advantages,
                    "response_values": values,
                    "value_targets": list(returns),
                }
            )
        )
        all_values += values
        all_returns += returns
        all_advantages += advantages
    metrics = {
        "critic/values/mean": mean_or_zero(all_values),
        "critic/returns/mean": mean_or_zero(all_returns),
        "critic/advantages/mean": mean_or_zero(all_advantages),
        "critic/vf_explained_var": explained_variance(all_values, all_returns),
    }
    return out, metrics


def mean_or_zero(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _variance(xs: Sequence[float]) -> float:
    mean = mean_or_zero(xs)
    return mean_or_zero([(x - mean) ** 2 for x in xs])
