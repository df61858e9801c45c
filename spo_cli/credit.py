"""Credit assignment measured against ground truth.

On a task that can say where a wrong response first departs from a correct solution (`Episode.first_error`, the
index of the first wrong response token; the arithmetic task can), the advantages a method gave that response
can be checked against it:

- misplaced blame: the share of the response's negative advantage mass on tokens *before* the first wrong token.
  Those tokens were right; blame there teaches the policy to avoid correct steps. A response-level method (GRPO)
  spreads one advantage over every token, so its figure is the share of tokens before the error
  (`uniform_blame`); an ideal assigner puts none there.
- localization: the share of wrong responses whose most negative segment contains the first wrong token, or
  starts within `slack` tokens after it (a segment boundary may fall just after a wrong digit). Segments tied at the
  lowest advantage are blamed together (one advantage spread over several segments blames them all alike). A method
  with one advantage per response localizes trivially, which `blamed_span` (the share of the response the blamed
  segments cover) shows.

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


def most_negative_segments(segments: Sequence[tuple[int, int, float]]) -> list[tuple[int, int]]:
    """(start, end) of every non-empty segment at the lowest advantage, if that is below 0 (ties blamed together),
    else []. `segments` are (start, end, advantage) in response order."""
    blamed = [(start, end, a) for start, end, a in segments if a < 0 and end > start]
    lowest = min((a for _, _, a in blamed), default=None)
    return [(start, end) for start, end, a in blamed if a == lowest]


def localizes(spans: Sequence[tuple[int, int]], first_error: int, slack: int = LOCALIZATION_SLACK) -> bool:
    """Whether a blamed span [start, end) holds `first_error` or starts at most `slack` tokens after it."""
    return any(start <= first_error < end or first_error < start <= first_error + slack for start, end in spans)


def credit_metrics(episodes: Sequence[Episode], slack: int = LOCALIZATION_SLACK) -> dict[str, float]:
    """The credit metrics (`credit/...`) of estimated episodes; empty when none is a wrong response with a known
    first error (a task that cannot tell, or no wrong responses)."""
    wrong = [ep for ep in episodes if ep.first_error is not None and ep.segments is not None]
    cases = [
        (token_advantages(ep), [(s.start, s.end, s.advantage or 0.0) for s in ep.segments], ep.first_error)
        for ep in wrong
    ]
    return summarize_credit(cases, slack)


CreditCase = tuple[Sequence[float], Sequence[tuple[int, int, float]], int]


def summarize_credit(cases: Sequence[CreditCase], slack: int = LOCALIZATION_SLACK) -> dict[str, float]:
    """The credit metrics of wrong responses given as (token advantages, segments as (start, end, advantage),
    first wrong token); empty without any."""
    if not cases:
        return {}
    misplaced, uniform, localized, spans = [], [], [], []
    for advantages, segments, first_wrong in cases:
        share = misplaced_blame(advantages, first_wrong)
        blamed = most_negative_segments(segments)
        if share is None or not blamed:
            continue
        n = len(advantages)
        misplaced.append(share)
        uniform.append(first_wrong / n)
        localized.append(float(localizes(blamed, first_wrong, slack)))
        spans.append(sum(end - start for start, end in blamed) / n)
    out = {"credit/wrong_responses": float(len(cases)), "credit/blamed_share": len(misplaced) / len(cases)}
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


# SPO-tree's episodes are its edges (one segment each); a wrong response is a root-to-leaf path of them, and its
# first wrong token (`PATH_FIRST_ERROR` in the leaf's `metadata["tree"]`) is a token of that whole path.
PATH_FIRST_ERROR = "path_first_error"


def tree_paths(nodes: Sequence[Episode]) -> dict[str, list[Episode]]:
    """Each leaf's root-to-leaf path of node episodes (`metadata["tree"]`: node, parent, leaf), by leaf episode id."""
    by_node = {(ep.group_id, str(ep.metadata["tree"]["node"])): ep for ep in nodes}
    paths = {}
    for leaf in nodes:
        if not leaf.metadata["tree"].get("leaf"):
            continue
        path, node = [], leaf
        while node is not None:
            path.append(node)
            node = by_node.get((leaf.group_id, str(node.metadata["tree"]["parent"])))
        paths[leaf.id] = path[::-1]
    return paths


def estimated_credit(inputs: Sequence[Episode], estimated: Sequence[Episode]) -> dict[str, float]:
    """The credit metrics of an estimation: of its estimated responses, or, when its inputs are SPO-tree's node
    episodes, of their wrong root-to-leaf paths."""
    if inputs and all("tree" in ep.metadata for ep in inputs):
        return tree_credit_metrics(inputs, estimated)
    return credit_metrics(estimated)


def tree_credit_metrics(
    nodes: Sequence[Episode], estimated: Sequence[Episode], slack: int = LOCALIZATION_SLACK
) -> dict[str, float]:
    """The credit metrics of SPO-tree's wrong root-to-leaf paths: each edge's tokens carry the edge's advantage
    (from `estimated`, the edges the estimator kept; 0 for the others), each edge is a segment.

    Args:
        nodes: every node episode of the iteration's trees, leaves with `PATH_FIRST_ERROR` where known.
        estimated: the estimator's output: node episodes whose segments carry their edge's advantage.
    """
    advantage = {ep.id: (ep.segments[0].advantage or 0.0) if ep.segments else 0.0 for ep in estimated}
    cases = []
    for leaf_id, path in tree_paths(nodes).items():
        first_wrong = path[-1].metadata["tree"].get(PATH_FIRST_ERROR)
        if first_wrong is None:
            continue
        segments, start = [], 0
        for ep in path:
            end = start + len(ep.response_token_ids)
            segments.append((start, end, advantage.get(ep.id, 0.0)))
            start = end
        tokens = [a for begin, end, a in segments for _ in range(end - begin)]
        cases.append((tokens, segments, first_wrong))
    return summarize_credit(cases, slack)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
