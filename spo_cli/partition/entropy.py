"""Entropy-percentile segments: high-entropy ("forking") tokens open segments (docs/algorithms.md#entropy-partition)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal


def linear_quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` with linear interpolation between order statistics.

    Same definition as ``torch.quantile`` and numpy's default ``method="linear"``: sort the
    ``n`` values, take the virtual index ``h = q * (n - 1)``, and interpolate between
    ``x[floor(h)]`` and ``x[floor(h) + 1]`` with weight ``w = h - floor(h)``: ``lo + w * (hi - lo)``
    for ``w < 0.5``, ``hi - (1 - w) * (hi - lo)`` otherwise. A threshold that lands on a
    sample is therefore that sample exactly, which matters because ties count as boundaries.
    The multiply-add is rounded once, as torch's CPU ``lerp`` (a fused multiply-add) does, so
    the float64 result equals ``torch.quantile``'s bit for bit; numpy rounds twice and can
    differ in the last ulp.

    Args:
        values (Sequence[float]): ``n >= 1`` finite numbers, in any order.
        q (float): quantile level in ``[0, 1]``.

    Returns:
        float: ``min(values)`` for ``q = 0``, ``max(values)`` for ``q = 1``.

    Raises:
        ValueError: if ``values`` is empty or ``q`` is outside ``[0, 1]``.
    """
    if not values:
        raise ValueError("the quantile of no values is undefined")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    h = q * (len(ordered) - 1)
    below = math.floor(h)
    above = min(below + 1, len(ordered) - 1)
    weight = h - below
    lo, hi = ordered[below], ordered[above]
    diff = Fraction(hi - lo)
    # Exact rationals give the single rounding of a fused multiply-add (math.fma needs 3.13).
    if weight < 0.5:
        return float(Fraction(lo) + Fraction(weight) * diff)
    return float(Fraction(hi) - Fraction(1.0 - weight) * diff)


def entropy_boundaries(
    entropies: Sequence[Sequence[float]],
    percentile: float = 0.05,
    scope: Literal["batch", "sequence"] = "batch",
    min_segment_length: int = 1,
    max_segments: int | None = None,
) -> list[list[int]]:
    """Per-sequence segment starts at the tokens whose entropy is in the top ``percentile``.

    The rule (decisions D2 and D3 of docs/algorithms.md#segment-gae):

    1. ``tau = linear_quantile(H, 1 - percentile)`` where ``H`` holds the entropies of all
       tokens of all sequences (``scope="batch"``, TRL's ``top_entropy_quantile``
       convention) or of one sequence (``scope="sequence"``, one ``tau`` per sequence).
    2. Token ``t`` is a boundary iff ``H_t >= tau`` (ties at ``tau`` included, so more than
       ``percentile`` of the tokens can qualify). Position 0 always opens the first
       segment, whatever its entropy.
    3. ``min_segment_length``: walking left to right, a boundary closer than this to the
       previous *kept* one (0 included) is dropped.
    4. ``max_segments``: of the boundaries left after step 3, keep 0 and the
       ``max_segments - 1`` with the highest entropy (equal entropies: the earlier token
       wins). Dropping boundaries only merges segments, so step 3's guarantee holds.

    Each boundary token opens its segment; the segment's value is read at the state
    before that token (D3).

    Args:
        entropies (Sequence[Sequence[float]]): ``[B][L_i]`` per-token entropies of each
            response's valid (policy-generated) tokens; sequences may be empty.
        percentile (float): fraction of tokens, in ``(0, 1]``, meant to open segments.
            Default ``0.05``.
        scope (Literal["batch", "sequence"]): where the quantile is taken. Default
            ``"batch"``. In a distributed run, ``"batch"`` needs the entropies of the global
            batch, which the caller has to gather.
        min_segment_length (int): smallest allowed distance between two kept boundaries,
            ``>= 1`` (1 keeps everything). Default ``1``.
        max_segments (int | None): at most this many segments per sequence, ``>= 1``;
            ``None`` means no cap. Default ``None``.

    Returns:
        list[list[int]]: for each sequence, strictly increasing token indices starting
        with ``0``; ``[]`` for an empty sequence. With ``percentile=0.2`` the worked example
        ``A = [0.1, 2.0, 0.2, 0.1, 1.5, 0.3, 0.1, 0.05]``, ``B = [0.4, 0.1, 0.1, 2.5, 0.2, 0.1]``
        gives ``tau = 0.84`` and ``[[0, 1, 4], [0, 3]]``.

    Raises:
        ValueError: if ``percentile`` is not in ``(0, 1]``, ``scope`` is unknown,
            ``min_segment_length < 1``, ``max_segments < 1`` or an entropy is NaN.
    """
    _check_entropy_inputs(entropies, percentile, scope, min_segment_length, max_segments)
    q = 1.0 - percentile
    batch_tau = None
    if scope == "batch" and any(entropies):
        batch_tau = linear_quantile([h for seq in entropies for h in seq], q)

    out: list[list[int]] = []
    for seq in entropies:
        if not seq:
            out.append([])
            continue
        tau = batch_tau if batch_tau is not None else linear_quantile(seq, q)
        out.append(_sequence_boundaries(seq, tau, min_segment_length, max_segments))
    return out


def _sequence_boundaries(seq: Sequence[float], tau: float, min_segment_length: int, max_segments: int | None) -> list[int]:
    """Steps 2-4 of `entropy_boundaries` for one non-empty sequence of entropies and its threshold `tau`."""
    candidates = [t for t in range(1, len(seq)) if seq[t] >= tau]
    kept = [0]
    for t in candidates:
        if t - kept[-1] >= min_segment_length:
            kept.append(t)
    if max_segments is not None and len(kept) > max_segments:
        # sorted() is stable, so among equal entropies the earlier token comes first.
        best = sorted(kept[1:], key=lambda t: -seq[t])[: max_segments - 1]
        kept = [0, *sorted(best)]
    return kept


def _check_entropy_inputs(
    entropies: Sequence[Sequence[float]], percentile: float, scope: str, min_segment_length: int, max_segments: int | None
) -> None:
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    if scope not in ("batch", "sequence"):
        raise ValueError(f"scope must be 'batch' or 'sequence', got {scope!r}")
    if min_segment_length < 1:
        raise ValueError(f"min_segment_length must be >= 1, got {min_segment_length}")
    if max_segments is not None and max_segments < 1:
        raise ValueError(f"max_segments must be >= 1 or None, got {max_segments}")
    # A NaN sorts arbitrarily and fails every comparison, so it would silently shift tau.
    if any(math.isnan(h) for seq in entropies for h in seq):
        raise ValueError("entropies contain NaN")
