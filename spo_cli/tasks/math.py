"""MATH / MATH500 / AIME: the R1-Distill prompt, gold answers, and a math-verify grader safe in any thread.

Grading follows the paper's evaluation (lighteval `extractive_match`, docs/tasks.md#math-grading): gold
parsed as LaTeX (wrapped in `$...$`, docs/software_stack.md#math-verify), prediction parsed as expression +
LaTeX with `\\boxed{}` priority, compared at 5 decimals. It is not the reference's training-time Minerva
grader, which spo does not port (docs/reference_differences.md#math-rewards-from-math-verify). Several
`\\boxed{}` answers in one sentence are read as one answer with several values, where the reference graders
take the last box (docs/reference_differences.md#math-grading-of-several-boxed-answers).

Why worker processes: math-verify enforces its time limits with `signal.alarm`, which only works in
a process's main thread (elsewhere it raises ValueError). `MathGrader` runs parse/verify in the main
thread of worker processes, where those limits work, and adds an outer per-item limit for hangs that
a signal cannot interrupt (e.g. long C-level computations).

Integers longer than Python's int-string conversion limit (`sys.get_int_max_str_digits()`, 4,300
digits by default) cannot be read by math-verify, which would score them 0: a gold and a final answer
(the last `\\boxed{}`, else the text after the last "####") that are both integers written out in
digits, one of them that long, are compared as digit strings instead. Other answers holding such a
number (e.g. a fraction of two of them) still score 0.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import math
import multiprocessing
import re
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

from spo_cli.errors import SpoUserError
from spo_cli.tasks.data import text_field

# open-r1's MATH prompt wrapped in the DeepSeek chat format by hand (docs/tasks.md#r1-distill-prompt). For
# `str.format`: `{{ANSWER}}` renders as `{ANSWER}`. Two spaces after "clearly." are intentional.
R1_PROMPT_TEMPLATE = (
    "<｜begin▁of▁sentence｜><｜User｜>Solve the following math problem efficiently and clearly.  "
    "The last line of your response should be of the following format: "
    "'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. "
    "Think step by step before answering.\n\n{problem}<｜Assistant｜><think>\n"
)

# Worker start-up (fork + math-verify import) takes ~1 s; allow a loaded machine much more.
_STARTUP_TIMEOUT_S = 60.0

# lighteval's extractive_match compares at precision 5 (`verify(..., float_rounding=5)`).
FLOAT_ROUNDING = 5


def format_r1_prompt(problem: str) -> str:
    """The R1-Distill sampling prompt for one problem (docs/tasks.md#r1-distill-prompt)."""
    return R1_PROMPT_TEMPLATE.format(problem=problem)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or None.

    Also accepts the brace-less `\\boxed 5` form (content up to the next `$`), as Hendrycks' MATH
    code does. Unbalanced braces -> None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")) :]
    if rest.startswith(" "):
        return rest[1:].split("$")[0].strip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def gold_answer(record: dict, where: str = "MATH record") -> str:
    """The gold answer string of a MATH-family record.

    MATH500 and AIME records carry `answer` (AIME as zero-padded strings like "025", or numbers;
    math-verify compares them numerically); MATH train/test only have `solution`, whose last
    `\\boxed{}` is the answer. Errors start with `where` (e.g. "data.jsonl: record 3").
    """
    if record.get("answer") is not None:
        return text_field(record, "answer", where, numbers=True).strip()
    boxed = last_boxed(text_field(record, "solution", where)) if record.get("solution") is not None else None
    if boxed is None:
        keys = ", ".join(sorted(record)) or "none"
        raise SpoUserError(
            f"{where} has no `answer` field and no \\boxed{{}} answer in `solution` (keys: {keys})"
        )
    return boxed


# ---------------------------------------------------------------------------------------------
# Grading. The helpers below run in whichever process grades: a pool worker, or the main thread.


@functools.cache
def _extraction_configs() -> tuple[list, list]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    # lighteval's prediction targets, in its order; boxed_match_priority=0 makes \boxed{} win.
    pred = [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)]
    return gold, pred


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    from math_verify import parse

    # Many responses share one gold (n samples per question): parse it once. Bare LaTeX like
    # `\frac{14}{3}` often fails to parse; wrapped in `$...$` it does (docs/software_stack.md#math-verify).
    parsed = parse(f"${gold}$", extraction_config=_extraction_configs()[0], parsing_timeout=timeout)
    return tuple(parsed)


# An integer in digits, bare or in groups of three with a thousands separator: 1,000  1\,000  1{,}000  1\ 000.
_INTEGER = re.compile(r"([+-]?)(\d+|\d{1,3}(?:(?:,|\\,|\{,\}|\\ | )\d{3})+)")


def _integer_text(text: str | None) -> str | None:
    """An integer written out in digits, in canonical form (no separators, no leading zeros or +, no -0); else None."""
    match = _INTEGER.fullmatch(text.strip().strip("$").strip()) if text is not None else None
    if match is None:
        return None
    sign, body = match.groups()
    digits = re.sub(r"\D", "", body).lstrip("0") or "0"
    return ("-" if sign == "-" and digits != "0" else "") + digits


def _long_integer_grade(response: str, gold: str) -> tuple[float, str, str] | None:
    """(score, answer as written, canonical answer) when the gold and the response's final answer are integers and
    one of them has more digits than Python converts (see the module docstring); None otherwise."""
    limit = sys.get_int_max_str_digits()
    written = last_boxed(response)
    if written is None and "####" in response:
        written = response.rsplit("####", 1)[1].strip()
    answer, expected = _integer_text(written), _integer_text(gold)
    if limit == 0 or answer is None or expected is None:
        return None
    if max(len(answer.lstrip("-")), len(expected.lstrip("-"))) <= limit:
        return None  # math-verify reads both
    return (1.0 if answer == expected else 0.0), written, answer


def _grade_one(response: str, gold: str, timeout: int | None) -> float:
    """1.0 if math-verify says `response` answers `gold`, else 0.0.

    `timeout` (whole seconds) bounds each math-verify parse and comparison via signal.alarm, so
    this must run in a main thread unless it is None (no limit).
    """
    from math_verify import parse, verify

    if (long := _long_integer_grade(response, gold)) is not None:
        return long[0]
    gold_parsed = list(_parse_gold(gold, timeout))
    pred_parsed = parse(response, extraction_config=_extraction_configs()[1], parsing_timeout=timeout)
    ok = verify(gold_parsed, pred_parsed, float_rounding=FLOAT_ROUNDING, timeout_seconds=timeout)
    return 1.0 if ok else 0.0


def _grade_one_safe(response: str, gold: str, timeout: int | None) -> float:
    # math-verify already swallows parse/verify errors (returns []/False); this catches the rest
    # (e.g. RecursionError, or its BaseException-derived TimeoutException escaping at an unlucky
    # moment) so one odd response cannot fail a whole batch.
    from math_verify.errors import TimeoutException

    try:
        return _grade_one(response, gold, timeout)
    except (Exception, TimeoutException):
        return 0.0


def _grade_extract(response: str, gold: str, timeout: int | None) -> tuple[float, str | None, str | None]:
    """(score, the answer as written, a canonical form for majority voting) of one response."""
    from math_verify import parse, verify

    if (long := _long_integer_grade(response, gold)) is not None:
        return long
    gold_parsed = list(_parse_gold(gold, timeout))
    pred_parsed = parse(response, extraction_config=_extraction_configs()[1], parsing_timeout=timeout)
    ok = verify(gold_parsed, pred_parsed, float_rounding=FLOAT_ROUNDING, timeout_seconds=timeout)
    if not pred_parsed:
        return (1.0 if ok else 0.0), None, None
    # parse() returns [sympy object, its LaTeX]: the sympy form makes 1/2 and \frac{1}{2} one vote. Its LaTeX is
    # normalised (0.5 comes back as \frac{1}{2}), so a boxed answer is shown as the response wrote it.
    written = last_boxed(response) or str(pred_parsed[-1])
    return (1.0 if ok else 0.0), written, str(pred_parsed[0])


def _grade_extract_safe(response: str, gold: str, timeout: int | None) -> tuple[float, str | None, str | None]:
    from math_verify.errors import TimeoutException

    try:
        return _grade_extract(response, gold, timeout)
    except (Exception, TimeoutException):
        return 0.0, None, None


def _worker_init() -> None:
    # Pay math-verify's import (~0.5 s, sympy) and regex compilation once per worker, not per item.
    from math_verify import parse

    parse("$1$", extraction_config=_extraction_configs()[1])


class MathGrader:
    """Grades (response, gold) pairs with math-verify in a pool of worker processes; usable from any thread.

    Time limits, two layers:
    - `timeout_s`: math-verify's own limit on each parse and each comparison (rounded up to whole
      seconds; None disables it). It works because workers call math-verify from their main thread.
      Over it, that parse/comparison fails, so the response counts as wrong.
    - `backstop_s` (default 6 x timeout_s + 5, or 60 s without timeout_s): how long to wait for one
      item's result. A worker past it is presumed stuck where a signal cannot reach (e.g. a long
      C-level computation): the pool is killed and recreated, that item scores 0.0 and unfinished
      items are resubmitted.
    A worker that dies (e.g. OOM) breaks the pool; unfinished items are then retried one at a time
    and the one that kills a worker again scores 0.0. Calls to `grade` are serialized by a lock.

    Workers come from a fork server and, as with any non-fork multiprocessing start method, re-import
    the main module: scripts must keep their top-level code under `if __name__ == "__main__":`.
    Starting the pool (on first use) raises RuntimeError if workers cannot start.
    """

    def __init__(
        self, timeout_s: float | None = 5.0, num_workers: int = 2, backstop_s: float | None = None
    ) -> None:
        # A worker that cannot import math-verify breaks the pool, which `grade` would turn into
        # silent 0.0 scores; check here instead (find_spec does not import it).
        if importlib.util.find_spec("math_verify") is None:
            raise SpoUserError(
                "MATH grading needs the `math-verify` package: pip install 'math-verify[antlr4_13_2]'"
            )
        # signal.alarm takes whole seconds, and 0 would mean "no limit".
        self.timeout = None if timeout_s is None else max(1, math.ceil(timeout_s))
        if backstop_s is None:
            backstop_s = 60.0 if timeout_s is None else 6 * timeout_s + 5
        self.backstop_s = backstop_s
        self.num_workers = num_workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        # forkserver, not fork: the trainer process has torch/OpenMP (and our own) threads, and
        # forking a multithreaded process can deadlock a child on a lock held by another thread.
        # The fork server is a clean single-threaded process started once, so new workers are cheap
        # forks of it (unlike spawn, which starts a fresh interpreter per worker); each worker still
        # imports math-verify once in `_worker_init`.
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_worker_init,
        )
        # Probe once: workers that cannot start (e.g. an unguarded __main__ re-imported by the
        # child) would otherwise look like crashes on every item and grade everything 0.0.
        try:
            probe = pool.submit(_grade_one_safe, "\\boxed{1}", "1", self.timeout)
            ok = probe.result(timeout=max(_STARTUP_TIMEOUT_S, self.backstop_s)) == 1.0
        except (BrokenProcessPool, concurrent.futures.TimeoutError) as e:
            _kill_pool(pool)
            raise RuntimeError(
                "math grading worker processes failed to start; a script that grades with MathGrader "
                "must guard its top-level code with `if __name__ == '__main__':` (workers re-import it)"
            ) from e
        if not ok:
            _kill_pool(pool)
            raise RuntimeError("math-verify failed its self-check (\\boxed{1} vs 1) in a worker")
        self._pool = pool
        return pool

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            _kill_pool(pool)

    def _grade_batch(
        self, work, indices: list[int], responses: list[str], golds: list[str], scores: list
    ) -> tuple[list[int], bool]:
        """Grade `indices` into `scores` with `work`; return (indices left to retry, whether a worker died)."""
        pool = self._get_pool()
        futures = [pool.submit(work, responses[i], golds[i], self.timeout) for i in indices]
        for pos, (i, future) in enumerate(zip(indices, futures)):
            try:
                scores[i] = future.result(timeout=self.backstop_s)
            except concurrent.futures.TimeoutError:
                self._discard_pool()  # item i keeps 0.0
                return _harvest(indices[pos + 1 :], futures[pos + 1 :], scores), False
            except BrokenProcessPool:
                self._discard_pool()
                return _harvest(indices[pos:], futures[pos:], scores), True
        return [], False

    def grade(self, responses: list[str], golds: list[str]) -> list[float]:
        """Scores (1.0 / 0.0) of responses[i] against golds[i]; golds are answer strings (not solutions)."""
        return self._run(_grade_one_safe, 0.0, responses, golds)

    def grade_and_extract(
        self, responses: list[str], golds: list[str]
    ) -> list[tuple[float, str | None, str | None]]:
        """(score, extracted answer as written, canonical answer) of each response; answers are None where
        math-verify finds none. The canonical form (sympy's) is what majority voting compares."""
        return self._run(_grade_extract_safe, (0.0, None, None), responses, golds)

    def _run(self, work, failed, responses: list[str], golds: list[str]) -> list:
        # An item that times out or kills its worker keeps `failed`.
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        scores = [failed] * len(responses)
        with self._lock:
            todo = list(range(len(responses)))
            one_at_a_time = False
            while todo:
                batch, rest = (todo[:1], todo[1:]) if one_at_a_time else (todo, [])
                left, crashed = self._grade_batch(work, batch, responses, golds, scores)
                if crashed and one_at_a_time:
                    left = []  # that lone item killed its worker: it keeps 0.0
                one_at_a_time = one_at_a_time or crashed
                todo = left + rest
        return scores

    def close(self) -> None:
        """Stop the worker processes (killing any still busy). The grader restarts them if used again."""
        with self._lock:
            self._discard_pool()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    if hasattr(pool, "kill_workers"):  # Python >= 3.14
        pool.kill_workers()
    else:
        # No public way to stop a busy worker before 3.14; `_processes` exists since 3.2.
        for process in list((pool._processes or {}).values()):
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _harvest(indices: list[int], futures: list[concurrent.futures.Future], scores: list[float]) -> list[int]:
    # After the pool is gone, keep what finished and hand back the rest for a retry.
    left = []
    for i, future in zip(indices, futures):
        if future.done() and not future.cancelled() and future.exception() is None:
            scores[i] = future.result()
        else:
            left.append(i)
    return left


def reward(response: str, gold: str, timeout_s: float = 5.0) -> float:
    """1.0 / 0.0 for one response against one gold answer string.

    On the main thread this grades in-process under math-verify's own time limits. Elsewhere it
    starts a one-worker MathGrader for the call (~1 s); graders of many items should hold a MathGrader.
    """
    if threading.current_thread() is threading.main_thread():
        return _grade_one_safe(response, gold, max(1, math.ceil(timeout_s)))
    with MathGrader(timeout_s=timeout_s, num_workers=1) as grader:
        return grader.grade([response], [gold])[0]
