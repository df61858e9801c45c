"""Value-network segment SPO (estimator.kind=segment_gae): GAE over segments (docs/algorithms.md#segment-gae,
decisions D3-D8).

Each segment is one macro-action. Its value V_k is the critic's value of the state before its first token
(D3: the boundary token opens the segment, so the high-entropy decision is credited with what follows it);
GAE runs over the K segments of a response with the outcome reward on the last one (D4, D5), and every token
of segment k gets A_k. Without a critic the estimator falls back to a group-mean baseline with lambda = 1 (D7).

The math is `gae_advantages` (shared with token-level PPO) applied to segments, plus the token whitening
of D6. Like the rest of the estimate stage this module needs neither torch nor a model: the critic's values
come from the caller (`spo_cli.estimate.critic.model.episode_values`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from spo_cli.episode import Episode
from spo_cli.estimate.gae import explained_variance, gae_advantages, mean_or_zero
from spo_cli.estimate.group import group_advantages

ValueLossPositions = Literal["segment_starts", "all_tokens"]


def segment_gae(
    segment_values: Sequence[float], reward: float, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Per-segment GAE of one response: the outcome reward is the last segment's, nothing is bootstrapped.

    R_k = 0 for k < K - 1 and R_{K-1} = reward, V_K = 0; then `gae_advantages` over the K segments::

        delta_k = R_k + gamma * V_{k+1} - V_k,   A_k = delta_k + gamma * lam * A_{k+1},   G_k = A_k + V_k

    A KL penalty in the reward (TRL PPO, D4) is not added here: a KL term, where a recipe has one, is part of
    the policy loss (`loss.beta`).

    Args:
        segment_values: [K] V_k, the critic's value of the state before segment k's first token.
        reward: the response's outcome reward.
        gamma: discount per segment.
        lam: GAE lambda over segments.

    Returns:
        (advantages A [K], returns G [K]); both empty for K = 0.
    """
    rewards = [0.0] * len(segment_values)
    if rewards:
        rewards[-1] = float(reward)
    return gae_advantages(rewards, segment_values, gamma, lam)


def spread_over_tokens(per_segment: Sequence[float], bounds: Sequence[tuple[int, int]]) -> list[float]:
    """Give every token of segment k the segment's number.

    Args:
        per_segment: [K] one number per segment.
        bounds: [K] half-open (start, end) token ranges, contiguous from 0 (an episode's segments).

    Returns:
        [T] with T = the last segment's end (0 for K = 0).
    """
    if len(per_segment) != len(bounds):
        raise ValueError(f"{len(per_segment)} numbers for {len(bounds)} segments")
    out: list[float] = []
    for x, (start, end) in zip(per_segment, bounds):
        out += [float(x)] * (end - start)
    return out


def segment_value_targets(
    returns: Sequence[float], bounds: Sequence[tuple[int, int]], positions: ValueLossPositions
) -> list[float | None]:
    """The critic's regression target at each response token (D8); None where it is not trained.

    Args:
        returns: [K] G_k of each segment.
        bounds: [K] half-open (start, end) token ranges, contiguous from 0.
        positions: `segment_starts`: G_k at segment k's first token only, where V_k is read;
            `all_tokens`: G_k at every token of segment k.

    Returns:
        [T] targets, T = the last segment's end.
    """
    if positions == "all_tokens":
        return list(spread_over_tokens(returns, bounds))
    targets: list[float | None] = [None] * (bounds[-1][1] if bounds else 0)
    for g, (start, _) in zip(returns, bounds, strict=True):
        targets[start] = float(g)
    return targets


def whiten_tokens(per_episode: Sequence[Sequence[float]], eps: float = 1e-8) -> list[list[float]]:
    """Whiten token advantages over all tokens of all episodes together (D6, TRL PPO's `masked_whiten`).

    (x - mean) / sqrt(var + eps) with the population variance of all tokens, as in the worked example of
    docs/algorithms.md#segment-gae-worked-example;
    TRL's `masked_whiten` applies Bessel's correction (n / (n - 1)), which differs by a negligible factor
    at batch sizes of thousands of tokens. A long segment counts once per token, so it weighs more.

    Args:
        per_episode: [N][T_i] advantages of each episode's response tokens.
        eps: added to the variance.

    Returns:
        [N][T_i] whitened copies; unchanged copies when there are no tokens at all.
    """
    flat = [float(x) for xs in per_episode for x in xs]
    if not flat:
        return [list(xs) for xs in per_episode]
    mean = math.fsum(flat) / len(flat)
    variance = math.fsum((x - mean) ** 2 for x in flat) / len(flat)
    scale = 1.0 / math.sqrt(variance + eps)
    return [[(x - mean) * scale for x in xs] for xs in per_episode]


def estimate_segment_gae(
    episodes: Sequence[Episode],
    values_per_episode: Sequence[Sequence[float]],
    gamma: float,
    lam: float,
    value_loss_positions: ValueLossPositions = "segment_starts",
    normalize_advantages: bool = True,
    eps: float = 1e-8,
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` with per-segment GAE advantages and value targets, and critic metrics.

    Each episode gets `response_values` (the critic's value before every response token: V_old of the
    clipped value loss), `value_targets` (`segment_value_targets`) and `token_advantages` (A_k on every
    token of segment k, whitened over all tokens of `episodes` when `normalize_advantages`). Each segment
    gets `value` = V_k and `advantage` = its tokens' final (whitened) advantage, so `token_advantages`
    and the segments agree; the raw A_k is G_k - V_k, readable from value_targets - response_values at the
    segment's start.

    Args:
        episodes: N partitioned episodes with rewards.
        values_per_episode: N lists [T_i], the critic's value before each response token of the episode.
        gamma: discount per segment.
        lam: GAE lambda over segments.
        value_loss_positions: where the critic is trained (`segment_value_targets`).
        normalize_advantages: whiten token advantages over the N episodes (`whiten_tokens`).
        eps: added to the variance when whitening.

    Returns:
        (episodes, metrics): `critic/values/mean`, `critic/returns/mean` and `critic/vf_explained_var` at the
        positions the critic is trained on; `critic/advantages/mean` per token before whitening;
        `segment_gae/segments` (mean per episode); `segment_gae/fallback` = 0.
    """
    if len(values_per_episode) != len(episodes):
        raise ValueError(f"{len(values_per_episode)} value lists for {len(episodes)} episodes")
    token_values, segment_values, raw_advantages, targets = [], [], [], []
    for ep, values in zip(episodes, values_per_episode):
        n = len(ep.response_token_ids)
        if len(values) != n:
            raise ValueError(f"episode {ep.id}: {len(values)} critic values for {n} response tokens")
        bounds = _bounds(ep)
        token_values.append([float(v) for v in values])
        segment_values.append([token_values[-1][start] for start, _ in bounds])
        advantages, returns = segment_gae(segment_values[-1], ep.reward, gamma, lam)
        raw_advantages.append(spread_over_tokens(advantages, bounds))
        targets.append(segment_value_targets(returns, bounds, value_loss_positions))
    final = whiten_tokens(raw_advantages, eps) if normalize_advantages else raw_advantages
    out = [
        _with_advantages(ep, adv, segment_values=sv, response_values=v, value_targets=t)
        for ep, adv, sv, v, t in zip(episodes, final, segment_values, token_values, targets)
    ]
    trained = [(v, g) for vs, gs in zip(token_values, targets) for v, g in zip(vs, gs) if g is not None]
    trained_values, trained_targets = [v for v, _ in trained], [g for _, g in trained]
    metrics = {
        "critic/values/mean": mean_or_zero(trained_values),
        "critic/returns/mean": mean_or_zero(trained_targets),
        "critic/advantages/mean": mean_or_zero([a for xs in raw_advantages for a in xs]),
        "critic/vf_explained_var": explained_variance(trained_values, trained_targets),
        **_common_metrics(episodes, fallback=False),
    }
    return out, metrics


def estimate_segment_gae_fallback(
    episodes: Sequence[Episode],
    scale_by_std: bool = False,
    normalize_advantages: bool = True,
    eps: float = 1e-8,
) -> tuple[list[Episode], dict[str, float]]:
    """Without a value network (D7): the group mean reward b(x) as every segment's value, lambda forced to 1.

    With V_k = b for all k and the reward on the last segment, GAE at lambda = 1 telescopes to A_k = r - b
    for every segment, so segments change nothing and are only logged. lambda < 1 would down-weight early
    segments for no reason (b is not a value of the state before them), and so would gamma < 1: both are
    ignored. Each token gets r - b (divided by the group's population std + eps when `scale_by_std`, as GRPO;
    `group_advantages`), then the whitening of `whiten_tokens` when `normalize_advantages`. No critic: the
    episodes carry no `response_values` or `value_targets`, and segments get no `value`.

    Args:
        episodes: N partitioned episodes with rewards; group_id names each one's prompt (groups of >= 2).
        scale_by_std: divide by the group's std as well.
        normalize_advantages: whiten token advantages over the N episodes.
        eps: added to the std (scaling) and to the variance (whitening).

    Returns:
        (episodes, metrics) with `segment_gae/fallback` = 1 so the run's logs say which estimator ran.
    """
    for ep in episodes:
        _bounds(ep)  # segments are only logged, but an unpartitioned episode is still a caller's mistake
    per_episode = group_advantages([ep.reward for ep in episodes], [ep.group_id for ep in episodes], scale_by_std, eps)
    raw = [[a] * len(ep.response_token_ids) for ep, a in zip(episodes, per_episode)]
    final = whiten_tokens(raw, eps) if normalize_advantages else raw
    return [_with_advantages(ep, adv) for ep, adv in zip(episodes, final)], _common_metrics(episodes, fallback=True)


def _with_advantages(
    ep: Episode,
    token_advantages: list[float],
    segment_values: list[float] | None = None,
    response_values: list[float] | None = None,
    value_targets: list[float | None] | None = None,
) -> Episode:
    """A copy of `ep` with final token advantages; each segment takes its first token's advantage, which is
    every one of its tokens' (whitening is one affine map for all tokens)."""
    values = segment_values if segment_values is not None else [None] * len(ep.segments)
    segments = [
        s.model_copy(update={"advantage": token_advantages[s.start], "value": v}) for s, v in zip(ep.segments, values)
    ]
    update = {"token_advantages": token_advantages, "response_values": response_values, "value_targets": value_targets}
    return ep.model_copy(update={"segments": segments, **update})


def _bounds(ep: Episode) -> list[tuple[int, int]]:
    if ep.segments is None:
        raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
    return [(s.start, s.end) for s in ep.segments]


def _common_metrics(episodes: Sequence[Episode], fallback: bool) -> dict[str, float]:
    return {
        "segment_gae/segments": mean_or_zero([len(ep.segments or []) for ep in episodes]),
        "segment_gae/fallback": float(fallback),
    }
