"""SPO-chain cutpoints: segment boundaries at low-probability tokens (docs/algorithms.md#cutpoint-partition)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cutpoint_boundaries(response_logprobs: Sequence[float], rho: float = 0.9, interval: int = 5) -> list[int]:
    """Response-token indices that open a new segment, chosen among low-probability tokens.

    The rule of SPO-chain (Guo et al., arXiv 2505.23564; docs/algorithms.md#cutpoint-partition):
    ``p_t = exp(response_logprobs[t])`` in float64, the candidates are
    ``K = [t for t in range(L) if p_t < rho]`` (strict), and every ``interval``-th candidate
    is kept: ``K[0::interval]``. Each returned index ``b`` is the first token of a segment;
    the reference stores the state before it as the cutpoint ``c = b - 1`` (``-1`` being the
    prompt-only state), so a returned ``0`` means the prompt state gets a value estimate.
    Tokens before the first boundary form a leading region whose start state is never
    estimated.

    Args:
        response_logprobs (Sequence[float]): ``log pi_old(y_t | x, y_<t)`` for each of the
            ``L`` response tokens, shape ``[L]``.
        rho (float): probability threshold in ``(0, 1]``; a token is a candidate iff its
            probability is strictly below it. Default ``0.9``.
        interval (int): keep candidates of rank ``0, interval, 2*interval, ...``; ``>= 1``.
            Default ``5`` (the reference class default, "int5").

    Returns:
        list[int]: strictly increasing indices in ``[0, L)``; ``[]`` when no token is below
        ``rho`` (then every advantage is 0) or ``L == 0``. A NaN log-prob is never a
        candidate, since ``nan < rho`` is false, as in the reference's ``np.where``.

    Raises:
        ValueError: if ``rho`` is not in ``(0, 1]`` or ``interval < 1``.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    # float64 like the reference: exponentiating in the tensor's float32 could move a token
    # lying within an ulp of rho to the other side of the threshold.
    candidates = [t for t, logprob in enumerate(response_logprobs) if math.exp(logprob) < rho]
    return candidates[::interval]
