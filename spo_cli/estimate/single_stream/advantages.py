"""Single-stream Policy Optimization (Xu & Ding 2025): the math of its per-prompt value tracker.

Each prompt x keeps a Beta(alpha, beta) belief about its success probability; its mean
v = alpha / (alpha + beta) is the baseline of the one response sampled for x. The functions here are
pure: numbers in, numbers out. The tracker object that holds the state is `spo_cli.estimate.single_stream.tracker`; the
estimate stage (`estimate_single_stream`) reads the baseline each episode carried from sampling time.
The method is described in docs/algorithms.md#single-stream-spo; the sections cited below are on that page.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Literal

from spo_cli.episode import Episode

BASELINE_KEY = "single_stream"


def initial_belief(
    scores: Sequence[float],
    n0: int,
    rho_min: float,
    init: Literal["jeffreys", "mean"] = "jeffreys",
    binarize_above: float = 0.0,
) -> tuple[float, float]:
    """(alpha0, beta0) of a prompt from its offline scores (docs/algorithms.md#single-stream-initial-beliefs).

    With s = successes (score > binarize_above) among the n scores and N0 = 1 / (1 - rho_min), the
    equilibrium pseudo-count of a tracker forgetting at rho_min::

        jeffreys (the reference code): v0 = (s + 0.5) / (n + 1)
        mean     (the paper):          v0 = s / n
        alpha0 = N0 * v0,  beta0 = N0 * (1 - v0)

    The reference divides by n0 + 1 even when a prompt has fewer than n0 scores, counting the missing
    ones as failures; we divide by the actual count. With `n0 == 0` every prompt starts at
    Beta(0.5, 0.5), scores unused. Worked example (n0 = 8, rho_min = 0.875, so N0 = 8): s = 3 of 8 gives
    jeffreys (3.111111, 4.888889) and mean (3, 5).

    Args:
        scores: the prompt's offline scores (raw rewards), at least one unless `n0 == 0`.
        n0: offline samples per prompt (the reference's offline_N).
        rho_min: lower bound of the forgetting factor, in (0, 1).
        init: "jeffreys" or "mean".
        binarize_above: a score counts as a success when strictly above this.
    """
    if n0 == 0:
        return 0.5, 0.5
    if not scores:
        raise ValueError("a prompt needs at least one offline score")
    if not 0.0 < rho_min < 1.0:
        raise ValueError(f"rho_min must be in (0, 1), got {rho_min}")
    successes = sum(1 for s in scores if s > binarize_above)
    n = len(scores)
    if init == "jeffreys":
        v0 = (successes + 0.5) / (n + 1)
    elif init == "mean":
        v0 = successes / n
    else:
        raise ValueError(f"unknown init {init!r}")
    n_eff = 1.0 / (1.0 - rho_min)
    return n_eff * v0, n_eff * (1.0 - v0)


def forgetting_factor(distance: float, d_half: float, rho_min: float, rho_max: float) -> float:
    """rho = clamp(2^(-D / d_half), rho_min, rho_max) (docs/algorithms.md#single-stream-forgetting-factor).

    D = 0 (a first visit) gives rho_max; with d_half = 0.06 and bounds [0.875, 0.96], D = 0.006 gives
    0.933033 and D = 0.03 gives 0.875. D is a distance between policies, so it must be >= 0.
    """
    if distance < 0 or math.isnan(distance):
        raise ValueError(f"the policy distance must be >= 0, got {distance}")
    if d_half <= 0:
        raise ValueError(f"d_half must be > 0, got {d_half}")
    return min(max(2.0 ** (-distance / d_half), rho_min), rho_max)


def belief_update(alpha: float, beta: float, reward: float, rho: float) -> tuple[float, float]:
    """Discount the old pseudo-counts by rho, then count the new 0/1 outcome (paper eq. 5;
    docs/algorithms.md#single-stream-tracker).

    alpha' = rho * alpha + r,  beta' = rho * beta + (1 - r). From (3, 5): r = 1, rho = 0.875 gives
    (3.625, 4.375), i.e. v = 0.453125. Rewards outside [0, 1] are clamped into it: the Beta belief is
    about a success probability.
    """
    r = min(max(float(reward), 0.0), 1.0)
    return rho * alpha + r, rho * beta + (1.0 - r)


def belief_value(alpha: float, beta: float) -> float:
    """The posterior mean alpha / (alpha + beta)."""
    return alpha / (alpha + beta)


def policy_distance(
    logprobs_then: Sequence[float],
    logprobs_now: Sequence[float],
    estimator: Literal["abs_logratio_mean", "k1", "k3"] = "abs_logratio_mean",
) -> float:
    """How far the policy moved, measured on one stored response (docs/algorithms.md#single-stream-forgetting-factor).

    `logprobs_then` are the response's token log-probs under the policy right after the update that followed
    the prompt's previous visit, `logprobs_now` under the current (post-update) policy; both [T]. With
    d_t = log pi_then - log pi_now::

        abs_logratio_mean (the reference): mean_t |d_t|
        k1:                                max(mean_t d_t, 0)
        k3:                                mean_t (exp(-d_t) + d_t - 1)

    An empty response gives 0.
    """
    if len(logprobs_then) != len(logprobs_now):
        raise ValueError(f"{len(logprobs_then)} stored log-probs but {len(logprobs_now)} new ones")
    if not logprobs_then:
        return 0.0
    diffs = [a - b for a, b in zip(logprobs_then, logprobs_now)]
    if estimator == "abs_logratio_mean":
        return sum(abs(d) for d in diffs) / len(diffs)
    if estimator == "k1":
        # A sample estimate of a KL can be negative; a negative distance would mean rho > 1.
        return max(sum(diffs) / len(diffs), 0.0)
    if estimator == "k3":
        return sum(math.exp(-d) + d - 1.0 for d in diffs) / len(diffs)
    raise ValueError(f"unknown policy distance estimator {estimator!r}")


def single_stream_advantages(
    rewards: Sequence[float],
    baselines: Sequence[float],
    lengths: Sequence[int] | None = None,
    norm: Literal["sample", "token", "none"] = "sample",
    eps: float = 1e-8,
) -> list[float]:
    """A_i = r_i - v_i, standardised over the whole batch (paper eq. 8-9; docs/algorithms.md#single-stream-advantages).

    `baselines` are the tracker values from *before* this step's observations, so the baseline does not
    depend on the action. `norm`:

    * "sample" (the reference): (A - mean(A)) / (std(A) + eps), the unbiased (n - 1) std over the N samples;
    * "token": the same with every sample weighted by its response length `lengths[i]` (mean and
      Bessel-style std over the N_tokens copies), which centres the quantity a token-mean loss sums;
    * "none": A unchanged.

    A batch of one has no std: it is only centred (giving 0). Worked example: r = [1, 0, 1, 0],
    v = [0.375, 0.375, 0.9, 0.1] give A = [0.625, -0.375, 0.1, -0.1] and, normalised,
    [1.331229, -1.035400, 0.088749, -0.384577].

    Args:
        rewards: [N] rewards.
        baselines: [N] pre-observation values (zeros for the no-baseline ablation).
        lengths: [N] response lengths in tokens; required for "token".
        norm: "sample", "token" or "none".
        eps: added to the std.

    Returns:
        [N] advantages, one per sample (broadcast to its tokens by the caller).
    """
    if len(rewards) != len(baselines):
        raise ValueError(f"{len(rewards)} rewards but {len(baselines)} baselines")
    raw = [float(r) - float(v) for r, v in zip(rewards, baselines)]
    if norm == "none" or not raw:
        return raw
    if norm == "sample":
        weights = [1.0] * len(raw)
    elif norm == "token":
        if lengths is None or len(lengths) != len(raw):
            raise ValueError("token normalisation needs one response length per sample")
        weights = [float(n) for n in lengths]
    else:
        raise ValueError(f"unknown advantage normalisation {norm!r}")
    total = math.fsum(weights)
    if total == 0:
        return [0.0] * len(raw)
    mean = math.fsum(w * a for w, a in zip(weights, raw)) / total
    if total <= 1:
        return [a - mean for a in raw]
    std = math.sqrt(math.fsum(w * (a - mean) ** 2 for w, a in zip(weights, raw)) / (total - 1))
    return [(a - mean) / (std + eps) for a in raw]


def sampling_weights(values: Sequence[float | None], epsilon: float = 0.05) -> list[float]:
    """Prioritised prompt sampling weights w = sqrt(v (1 - v)) + epsilon (paper eq. 11;
    docs/algorithms.md#single-stream-prompt-sampling).

    The first term is a Bernoulli std, favouring prompts near 50 % success; epsilon keeps solved and
    unsolved prompts reachable. A prompt without a value (None: no offline estimate) gets weight 0 and is
    never drawn. v = 0.5 gives 0.55, v = 0.375 gives 0.534123.
    """
    return [0.0 if v is None else math.sqrt(max(v * (1.0 - v), 0.0)) + epsilon for v in values]


def weighted_sample_without_replacement(weights: Sequence[float], k: int, rng: random.Random) -> list[int]:
    """k distinct indices, drawn one after another with probability proportional to the remaining weights.

    This is numpy's `choice(M, k, replace=False, p=w / sum(w))`, the reference's draw, computed with
    Efraimidis-Spirakis keys (u^(1/w), largest first), which have the same distribution as sequential draws
    in O(M log M). Zero weights are never drawn. Returned in draw order.

    Raises:
        ValueError: if fewer than k indices have a positive weight, or a weight is negative or NaN.
    """
    if any(not (w >= 0) for w in weights):
        raise ValueError("sampling weights must be >= 0")
    positive = [i for i, w in enumerate(weights) if w > 0]
    if len(positive) < k:
        raise ValueError(f"cannot draw {k} distinct prompts: only {len(positive)} have a positive sampling weight")
    # log(u) / w orders like u^(1/w) and does not underflow for small weights.
    keys = [(math.log(1.0 - rng.random()) / weights[i], i) for i in positive]
    keys.sort(reverse=True)
    return [i for _, i in keys[:k]]


def estimate_single_stream(
    episodes: Sequence[Episode],
    norm: Literal["sample", "token", "none"] = "sample",
    use_baseline: bool = True,
    eps: float = 1e-8,
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of `episodes` whose segments all carry the sample's normalised advantage, and metrics.

    Each episode's baseline is `metadata["single_stream"]["value"]`, the tracker value of its prompt
    recorded when it was sampled (before this step's observation).
    """
    baselines = []
    for ep in episodes:
        entry = ep.metadata.get(BASELINE_KEY)
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
            raise ValueError(
                f"episode {ep.id} has no single-stream baseline (metadata.{BASELINE_KEY}.value): only episodes "
                "sampled by a single_stream run carry their prompt's tracker value from sampling time"
            )
        baselines.append(float(entry["value"]) if use_baseline else 0.0)
    rewards = [float(ep.reward) for ep in episodes]
    lengths = [len(ep.response_token_ids) for ep in episodes]
    advantages = single_stream_advantages(rewards, baselines, lengths, norm, eps)
    out = []
    for ep, a in zip(episodes, advantages):
        segments = [s.model_copy(update={"advantage": a}) for s in ep.segments]
        out.append(ep.model_copy(update={"segments": segments, "token_advantages": None}))
    raw = [r - b for r, b in zip(rewards, baselines)]
    metrics = {"single_stream/adv_before_norm": statistics.fmean(raw) if raw else 0.0}
    if len(advantages) >= 2:
        cuts = statistics.quantiles(advantages, n=10, method="inclusive")
        for p in (10, 30, 50, 70, 90):
            metrics[f"single_stream/adv_after_norm/p{p}"] = cuts[p // 10 - 1]
    return out, metrics
