"""The math of evaluation: generation budgets, pass@k, majority voting. Numbers in, numbers out."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_CONTEXT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*$")


def parse_context(text: str) -> int:
    """Tokens of one generation budget: "2k" / "2K" -> 2048, "4096" -> 4096, "1.5k" -> 1536.

    Raises ValueError for anything else (a budget must be a whole, positive number of tokens).
    """
    match = _CONTEXT_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a token budget (examples: 2k, 4096, 32K)")
    number, unit = float(match.group(1)), match.group(2)
    tokens = number * (1024 if unit else 1)
    if tokens != int(tokens) or tokens < 1:
        raise ValueError(f"{text!r} is not a whole, positive number of tokens")
    return int(tokens)


def parse_contexts(text: str) -> list[int]:
    """A comma-separated list of budgets, in the order given, repeats dropped: "2k,4k,2048" -> [2048, 4096]."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no token budget given (examples: 2k,4k,32k)")
    return list(dict.fromkeys(parse_context(p) for p in parts))


def context_label(tokens: int) -> str:
    """The short name of a budget: 2048 -> "2k", 32768 -> "32k", 300 -> "300"."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1).

    1 - C(n-c, k) / C(n, k): the chance that k samples drawn without replacement from the n include a
    correct one. Needs 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampling_standard_error(correct: Sequence[int], samples: int) -> float:
    """Standard error of a sampled accuracy from the sampling alone, with the problems held fixed: how far the mean
    accuracy over `len(correct)` problems x `samples` responses moves between evaluations of one policy on these
    problems with other seeds (what a rise must exceed to mean that the policy improved).

    correct[i] is the number of problem i's `samples` responses that were right. Each problem's variance
    p_i (1 - p_i) is estimated without bias by k/(k-1) p^_i (1 - p^_i) (k = samples), so
    SE = sqrt(sum_i p^_i (1 - p^_i) / (k - 1)) / n. Needs k >= 2 and at least one problem.
    """
    if samples < 2 or not correct:
        raise ValueError(f"a sampling standard error needs >= 2 samples of >= 1 problem; got {samples} x {len(correct)}")
    if any(not 0 <= c <= samples for c in correct):
        raise ValueError(f"every count of correct responses must lie in [0, {samples}]")
    spread = sum((c / samples) * (1 - c / samples) for c in correct) / (samples - 1)
    return math.sqrt(spread) / len(correct)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k of one problem: whether the most frequent extracted answer is correct.

    Responses without an answer (None) do not vote; no answer at all counts as wrong. A tie goes to the
    answer that appeared first. The winner's correctness is that of its first response.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = max(votes, key=lambda a: (votes[a], -answers.index(a)))
    return bool(correct[answers.index(winner)])


def summarize(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]]) -> dict[str, float]:
    """Metrics of one evaluation from per-problem lists of K samples' correctness and vote keys.

    Shapes: `correct` and `answers` are [problems][K] with the same K for every problem.
    Returns `accuracy` (pass@1: the mean over problems of c/K), and with K > 1 also `accuracy_se` (its sampling
    standard error with the problems fixed, `sampling_standard_error`), `avg@K` (the same
    number under the name long-CoT papers use), `pass@K` (every problem's unbiased estimate is 1 if any
    sample is correct) and `maj@K` (majority vote over extracted answers).
    """
    if len(correct) != len(answers):
        raise ValueError(f"{len(correct)} problems of correctness flags but {len(answers)} of answers")
    if not correct:
        return {"accuracy": 0.0}
    k = len(correct[0])
    if k == 0 or any(len(row) != k for row in correct):
        raise ValueError("every problem needs the same, positive number of samples")
    problems = len(correct)
    per_problem = [sum(row) / k for row in correct]
    out = {"accuracy": sum(per_problem) / problems}
    if k > 1:
        out["accuracy_se"] = sampling_standard_error([sum(row) for row in correct], k)
        out[f"avg@{k}"] = out["accuracy"]
        for j in (2**e for e in range(1, k.bit_length()) if 2**e < k):
            out[f"pass@{j}"] = sum(pass_at_k(k, sum(row), j) for row in correct) / problems
        out[f"pass@{k}"] = sum(pass_at_k(k, sum(row), k) for row in correct) / problems
        out[f"maj@{k}"] = sum(majority_correct(a, c) for a, c in zip(answers, correct)) / problems
    return out
