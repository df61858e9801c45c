"""Credit assignment measured against ground truth.

On a task that can say where a wrong response first departs from a correct solution (`Episode.first_error`, the
index of the first wrong response token; the arithmetic task can), the advantages a method gave that response
can be checked against it:

- misplaced blame: the share of the response's negative advantage mass on tokens *before* the first wrong token.
  Those tokens were right; blame there teaches the policy to avoid correct steps. A response-level method (GRPO)
  spreads one advantage over every token, so its figure is the share of tokens before the error
  (`uniform_blame`); an ideal assigner puts none there.
- localization: the share of wrong responses whose most negative segment contains the first wrong token, or
  starts within `slack` tokens after it (a segment boundary may fall just after a wrong digit). Ties go to the
  earliest segment. A method with one segment per response localizes trivially, which `blamed_span` (the share of
  the response that most negative segment covers) shows.

Only wrong responses with a known first error count, and only those with some negative advantage count for
misplaced blame and localization (`blamed_share` says how many: GRPO gives a group of all-wrong responses none).

Pure functions of numbers and episodes; no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spo_cli.episode import Episode, token_advantages

LOCALIZATION_SLACK = 3  # tokens: a boundary just after the wrong token still localizes it


def token_at_char(offset: int, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int | None:
    """Index of the token whose text holds character `offset` of `decode(token_ids)`, or None past its end.

    Decodes growing prefixes, so multi-token characters and merged pieces map as the text reads; stops at the
    answer (the first error is usually early), so its cost is about `offset` decodes.
    """
    for k in range(len(token_ids)):
        if len(decode(token_ids[: k + 1])) > offset:
            return k
    return None


def misplaced_blame(advantages: Sequence[float], first_error: int) -> float | None:
    """Share of the negative advantage mass of one response on tokens before `first_error`; None without any.

    Args:
        advantages: advantage of each response token, length T.
        first_error: index (0..T-1) of the first wrong token.
    """
    negative = [max(-a, 0.0) for a in advantages]
    total = sum(negative)
    if total <= 0.0:
        return None
    return sum(negative[:first_error]) / total


def most_negative_segment(segments: Sequence[tuple[int, int, float]]) -> tuple[int, int] | None:
    """(start, end) of the segment with the lowest advantage among those below 0 (the earliest on a tie), else
    None. `segments` are (start, end, advantage) in response order."""
    lowest = None
    for start, end, advantage in segments:
        if advantage < 0 and end > start and (lowest is None or advantage < lowest[2]):
            lowest = (start, end, advantage)
    return None if lowest is None else (lowest[0], lowest[1])


def localizes(span: tuple[int, int], first_error: int, slack: int = LOCALIZATION_SLACK) -> bool:
    """Whether the blamed `span` [start, end) holds `first_error` or starts at most `slack` tokens after it."""
    start, end = span
    return start <= first_error < end or first_error < start <= first_error + slack


def credit_metrics(episodes: Sequence[Episode], slack: int = LOCALIZATION_SLACK) -> dict[str, float]:
    """The credit metrics (`credit/...`) of estimated episodes; empty when none is a wrong response with a known
    first error (a task that cannot tell, or no wrong responses)."""
    wrong = [ep for ep in episodes if ep.first_error is not None and ep.segments is not None]
    if not wrong:
        return {}
    misplaced, uniform, localized, spans = [], [], [], []
    for ep in wrong:
        share = misplaced_blame(token_advantages(ep), ep.first_error)
        blamed = most_negative_segment([(s.start, s.end, s.advantage or 0.0) for s in ep.segments])
        if share is None or blamed is None:
            continue
        n = len(ep.response_token_ids)
        misplaced.append(share)
        uniform.append(ep.first_error / n)
        localized.append(float(localizes(blamed, ep.first_error, slack)))
        spans.append((blamed[1] - blamed[0]) / n)
    out = {"credit/wrong_responses": float(len(wrong)), "credit/blamed_share": len(misplaced) / len(wrong)}
    if misplaced:
        out.update(
            {
                "credit/misplaced_blame": _mean(misplaced),
                "credit/uniform_blame": _mean(uniform),
                "credit/localization": _mean(localized),
                "credit/blamed_span": _mean(spans),
            }
        )
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
