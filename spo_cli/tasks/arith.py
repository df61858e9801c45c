"""Synthetic multi-step arithmetic in GSM8K answer format (docs/tasks.md#synthetic-arithmetic).

    Start at 6. Times 6. Minus 17. Times 2. Result?      <- question
    6*6=36\\n36-17=19\\n19*2=38\\n#### 38                  <- solution; answer "38"

Every intermediate value stays in 0..max_val because each operand is drawn to keep it there.
The reward is `spo_cli.tasks.gsm8k.reward` (same "#### <answer>" format). Every step of the worked solution is
determined by the question, so `first_error` can say where a wrong response first departs from it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from spo_cli.errors import SpoUserError
from spo_cli.tools.calls import ToolMarkers, output_block

# Draws allowed per wanted problem before giving up: the question space can be smaller than asked
# for (e.g. 1-step problems with small knobs), and looping forever would hide that.
_MAX_TRIES_PER_PROBLEM = 1000


@dataclass(frozen=True)
class ArithProblem:
    """One problem: `question` (the prompt text), `solution` (worked lines ending "\\n#### <answer>"),
    `answer` (the gold string, a non-negative integer)."""

    question: str
    solution: str
    answer: str


def _check_knobs(n_steps: int, max_start: int, max_add: int, max_mul: int, max_val: int) -> None:
    # The generator's operand draws are only well-defined inside these ranges.
    problems = []
    if n_steps < 1:
        problems.append(f"n_steps={n_steps} must be >= 1")
    if not 1 <= max_start <= max_val:
        problems.append(f"max_start={max_start} must be in 1..max_val ({max_val})")
    if max_add < 1:
        problems.append(f"max_add={max_add} must be >= 1")
    if max_mul < 2:
        problems.append(f"max_mul={max_mul} must be >= 2")
    if problems:
        raise SpoUserError("arithmetic task: " + "; ".join(problems))


def make_problem(
    rng: random.Random,
    n_steps: int,
    max_start: int = 20,
    max_add: int = 20,
    max_mul: int = 9,
    max_val: int = 99,
) -> ArithProblem:
    """One problem with `n_steps` operations, drawn from `rng` (port of the feasibility study's generator,
    docs/tasks.md#arithmetic-generator).

    Same draws as the original for every path where the original runs; the one change: at x == 0 the
    original can pick "mul" and divide by zero (`max_val // x`), so "mul" at 0 becomes "add" exactly as
    "sub" at 0 already does (the choice list is unchanged, so other draws are unaffected).
    """
    _check_knobs(n_steps, max_start, max_add, max_mul, max_val)
    x = rng.randint(1, max_start)
    words, lines = [f"Start at {x}."], []
    for _ in range(n_steps):
        ops = ["add", "sub"] + (["mul"] if 2 * x <= max_val else [])
        if x >= max_val - 1:
            ops.remove("add")
        op = rng.choice(ops)
        if op in ("sub", "mul") and x == 0:
            op = "add"
        if op == "add":
            b = rng.randint(1, min(max_add, max_val - x))
            y, word, sign = x + b, "Add", "+"
        elif op == "sub":
            b = rng.randint(1, min(max_add, x))
            y, word, sign = x - b, "Minus", "-"
        else:
            b = rng.randint(2, min(max_mul, max_val // x))
            y, word, sign = x * b, "Times", "*"
        words.append(f"{word} {b}.")
        lines.append(f"{x}{sign}{b}={y}")
        x = y
    return ArithProblem(
        question=" ".join(words) + " Result?",
        solution="\n".join(lines) + f"\n#### {x}",
        answer=str(x),
    )


def held_out_problems(
    seed: int, n_per_step: int, step_counts: Sequence[int], **knobs: int
) -> list[ArithProblem]:
    """`n_per_step` distinct problems for each step count, in order; deterministic in `seed`.

    The feasibility study's held-out set (docs/tasks.md#arithmetic-held-out-set) is seed-fixed, 200 per step
    count for 2, 3 and 4 steps. Questions are distinct across the whole list (different step counts can never
    collide anyway).
    `knobs` are make_problem's max_start / max_add / max_mul / max_val.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[ArithProblem] = []
    for n_steps in step_counts:
        found = 0
        for _ in range(_MAX_TRIES_PER_PROBLEM * n_per_step):
            if found == n_per_step:
                break
            problem = make_problem(rng, n_steps, **knobs)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
                found += 1
        if found < n_per_step:
            raise SpoUserError(
                f"arithmetic task: could not draw {n_per_step} distinct {n_steps}-step held-out problems "
                f"(found {found}); lower the count or widen max_start/max_add/max_mul/max_val"
            )
    return problems


def sample_problems(
    rng: random.Random,
    n: int,
    min_steps: int,
    max_steps: int,
    exclude: frozenset[str] | set[str],
    **knobs: int,
) -> list[ArithProblem]:
    """`n` training problems, n_steps ~ U{min_steps..max_steps}, skipping questions in `exclude`.

    Repeats are allowed (the feasibility study samples training problems on the fly); `exclude` is the
    held-out question set. `knobs` are make_problem's max_start / max_add / max_mul / max_val.
    """
    if not 1 <= min_steps <= max_steps:
        raise SpoUserError(f"arithmetic task: need 1 <= min_steps ({min_steps}) <= max_steps ({max_steps})")
    problems: list[ArithProblem] = []
    for _ in range(n):
        for _ in range(_MAX_TRIES_PER_PROBLEM):
            problem = make_problem(rng, rng.randint(min_steps, max_steps), **knobs)
            if problem.question not in exclude:
                problems.append(problem)
                break
        else:
            raise SpoUserError(
                f"arithmetic task: {_MAX_TRIES_PER_PROBLEM} draws in a row were all held-out questions; "
                "the held-out set covers (almost) every problem with these steps and knobs"
            )
    return problems


def distinct_problems(
    rng: random.Random,
    n: int,
    min_steps: int,
    max_steps: int,
    exclude: frozenset[str] | set[str],
    **knobs: int,
) -> list[ArithProblem]:
    """`n` training problems with pairwise different questions (a fixed training pool), none in `exclude`."""
    seen: set[str] = set(exclude)
    problems: list[ArithProblem] = []
    misses = 0
    while len(problems) < n:
        (problem,) = sample_problems(rng, 1, min_steps, max_steps, exclude, **knobs)
        if problem.question in seen:
            misses += 1
            if misses > _MAX_TRIES_PER_PROBLEM * max(n, 1):
                raise SpoUserError(
                    f"arithmetic task: could not draw {n} distinct training problems (found {len(problems)}); lower "
                    "task.train_pool_size or widen max_start/max_add/max_mul/max_val"
                )
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def with_openers(solution: str, openers: Sequence[str], rng: random.Random) -> str:
    """`solution` with each worked line (not the final "#### " line) opened by one of `openers`, drawn uniformly.

    The openers are phrasing, never a mistake ("So 6*6=36"): the forks a real model's reasoning is full of, where
    the next token is uncertain and yet nothing can go wrong. Without openers the solution is unchanged.
    """
    if not openers:
        return solution
    *worked, answer = solution.split("\n")
    return "\n".join([*(rng.choice(openers) + line for line in worked), answer])


WORKED_LINE = re.compile(r"^(-?\d+)([-+*])(\d+)=(-?\d+)$")


def with_calculator(
    solution: str, markers: ToolMarkers, operations: str = "*", rate: float = 1.0, rng: random.Random | None = None
) -> str:
    """`solution` with every worked line whose operation is in `operations` ("+", "-", "*") computed by a tool
    call first (the tool demo, docs/tools.md): the line "a*b=c" follows `code_start`print(a*b)`code_end` and the
    output block the tool loop appends, so the solution is exactly what a response that calls the tool reads
    like. Other lines are unchanged. With `rate` < 1 each such line calls with that probability (`rng` draws)."""
    out = []
    for line in solution.split("\n"):
        found = WORKED_LINE.match(line)
        if found is not None and found[2] in operations and (rate >= 1.0 or rng.random() < rate):
            a, op, b, c = found.groups()
            call = f"{markers.code_start}print({a}{op}{b}){markers.code_end}"
            line = call + output_block(call, c + "\n", markers) + line
        out.append(line)
    return "\n".join(out)


def without_calls(text: str, markers: ToolMarkers) -> str:
    """`text` with every tool call and its output block removed (a calculator solution's plain lines)."""
    call = re.escape(markers.code_start) + ".*?" + re.escape(markers.code_end)
    output = re.escape(markers.output_start) + ".*?" + re.escape(markers.output_end) + "\n?"
    return re.sub(call + r"\n?" + output, "", text, flags=re.S)


def calculator_first_error(response: str, solution: str, markers: ToolMarkers, operations: str) -> int | None:
    """`first_error` for a calculator task: each worked line of the operations the tool computes is correct with
    or without its call before it (a line computed in the head is not a mistake; only a wrong number is)."""
    *worked, answer = without_calls(solution, markers).split("\n")
    steps = []
    for line in worked:
        found = WORKED_LINE.match(line)
        called = with_calculator(line, markers, operations) + "\n"
        steps.append([called, line + "\n"] if found is not None and found[2] in operations else [line + "\n"])
    return first_departure(response, [*steps, [answer]])


def first_error(response: str, solution: str, openers: Sequence[str] = ()) -> int | None:
    """Character offset in `response` of the first character that departs from every correct response, or None when
    none does (the response is correct, up to trailing whitespace, or a prefix of a correct one: cut short, not
    wrong).

    Without `openers` the worked `solution` is the only correct response: each line is fixed by the question (start
    value, operation, operand, result) and the format is the task's own, so the first differing character is where
    the response first went wrong: the wrong digit of a result, a wrong operand, a skipped step, or an early "#### ".
    With `openers` (`with_openers`), each worked line may start with any one of them; the response departs where it
    leaves the line's every opened form. A response that is unreadable from its start departs at 0.
    """
    if not openers:
        common = len(os.path.commonprefix([response, solution]))
        return None if common >= len(response.rstrip()) else common
    *worked, answer = solution.split("\n")
    return first_departure(response, [[opener + line + "\n" for opener in openers] for line in worked] + [[answer]])


def first_departure(response: str, steps: Sequence[Sequence[str]]) -> int | None:
    """Where `response` leaves every correct reading of `steps` (each step one of its forms, in order), None when
    it never does (correct, or a prefix of a correct response)."""
    pos = 0
    for expected in steps:
        rest = response[pos:]
        common = max(len(os.path.commonprefix([rest, form])) for form in expected)
        matched = next((form for form in expected if rest.startswith(form)), None)
        if matched is None:
            return None if pos + common >= len(response.rstrip()) else pos + common
        pos += len(matched)
    return None if pos >= len(response.rstrip()) else pos
