"""The synthetic arithmetic generator (docs/tasks.md#arithmetic-generator)."""

from __future__ import annotations

import random
import re

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.tasks import arith, gsm8k

LINE_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
WORD_FOR = {"+": "Add", "-": "Minus", "*": "Times"}


def spec_make_problem(rng, n_steps, max_start=20, max_add=20, max_mul=9, max_val=99):
    """The feasibility study's original generator, verbatim (modulo line breaks), to check the port against."""
    x = rng.randint(1, max_start)
    words, lines = [f"Start at {x}."], []
    for _ in range(n_steps):
        ops = ["add", "sub"] + (["mul"] if 2 * x <= max_val else [])
        if x >= max_val - 1:
            ops.remove("add")
        op = rng.choice(ops)
        if op == "sub" and x == 0:
            op = "add"
        if op == "add":
            b = rng.randint(1, min(max_add, max_val - x)); y = x + b; w, s = "Add", "+"
        elif op == "sub":
            b = rng.randint(1, min(max_add, x)); y = x - b; w, s = "Minus", "-"
        else:
            b = rng.randint(2, min(max_mul, max_val // x)); y = x * b; w, s = "Times", "*"
        words.append(f"{w} {b}."); lines.append(f"{x}{s}{b}={y}"); x = y
    return " ".join(words) + " Result?", "\n".join(lines) + f"\n#### {x}", x


def check_problem(problem: arith.ArithProblem, n_steps: int, max_val: int) -> None:
    *lines, last = problem.solution.split("\n")
    assert last == f"#### {problem.answer}"
    assert len(lines) == n_steps
    words = problem.question.removesuffix(" Result?").split(". ")
    assert problem.question.endswith(" Result?") and words[0].startswith("Start at ")
    x = int(words[0].removeprefix("Start at "))
    for line, word in zip(lines, words[1:], strict=True):
        a, op, b, y = LINE_RE.match(line).groups()
        a, b, y = int(a), int(b), int(y)
        assert a == x  # chained: left operand is the previous result
        assert y == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert word.rstrip(".") == f"{WORD_FOR[op]} {b}"
        assert 0 <= y <= max_val
        x = y
    assert problem.answer == str(x)
    assert gsm8k.reward(problem.solution, problem.answer) == 1.0


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"max_start": 5, "max_add": 5, "max_mul": 3, "max_val": 12},
        {"max_start": 2, "max_add": 1, "max_mul": 2, "max_val": 2},
    ],
)
def test_generated_problems_are_correct(knobs: dict) -> None:
    rng = random.Random(0)
    max_val = knobs.get("max_val", 99)
    for _ in range(1500):
        n_steps = rng.randint(1, 6)
        check_problem(arith.make_problem(rng, n_steps, **knobs), n_steps, max_val)


def test_matches_spec_generator_and_avoids_its_zero_division() -> None:
    crashes = 0
    for seed in range(3000):
        try:
            question, solution, answer = spec_make_problem(random.Random(seed), 5)
        except ZeroDivisionError:  # the original picks "mul" at x == 0
            crashes += 1
            check_problem(arith.make_problem(random.Random(seed), 5), 5, 99)
            continue
        expected = arith.ArithProblem(question, solution, str(answer))
        assert arith.make_problem(random.Random(seed), 5) == expected
    assert crashes > 0


def test_spec_example_format() -> None:
    problem = arith.ArithProblem(
        "Start at 6. Times 6. Minus 17. Times 2. Result?", "6*6=36\n36-17=19\n19*2=38\n#### 38", "38"
    )
    check_problem(problem, 3, 99)


def test_held_out_is_deterministic_and_distinct() -> None:
    first = arith.held_out_problems(seed=1234, n_per_step=200, step_counts=[2, 3, 4])
    assert first == arith.held_out_problems(seed=1234, n_per_step=200, step_counts=[2, 3, 4])
    assert first != arith.held_out_problems(seed=1235, n_per_step=200, step_counts=[2, 3, 4])
    assert len(first) == 600 and len({p.question for p in first}) == 600
    assert [len(p.solution.split("\n")) - 1 for p in first] == [2] * 200 + [3] * 200 + [4] * 200


def test_held_out_reports_too_small_space() -> None:
    # 1-step problems with these knobs: starts 1..2 x few operands, far fewer than 50 questions.
    with pytest.raises(SpoUserError, match="distinct 1-step"):
        knobs = {"max_start": 2, "max_add": 2, "max_mul": 2, "max_val": 5}
        arith.held_out_problems(seed=0, n_per_step=50, step_counts=[1], **knobs)


def test_sample_problems_excludes_held_out() -> None:
    knobs = {"max_start": 4, "max_add": 3, "max_mul": 2, "max_val": 9}  # small space: collisions are certain
    held_out = arith.held_out_problems(seed=0, n_per_step=15, step_counts=[1, 2], **knobs)
    exclude = frozenset(p.question for p in held_out)
    sampled = arith.sample_problems(random.Random(7), 2000, 1, 2, exclude, **knobs)
    assert len(sampled) == 2000
    assert not exclude & {p.question for p in sampled}
    assert {len(p.solution.split("\n")) - 1 for p in sampled} == {1, 2}
    assert sampled == arith.sample_problems(random.Random(7), 2000, 1, 2, exclude, **knobs)


def test_sample_problems_gives_up_when_everything_is_excluded() -> None:
    knobs = {"max_start": 1, "max_add": 1, "max_mul": 2, "max_val": 2}
    everything = {arith.make_problem(random.Random(s), 1, **knobs).question for s in range(200)}
    with pytest.raises(SpoUserError, match="held-out"):
        arith.sample_problems(random.Random(0), 1, 1, 1, everything, **knobs)


def test_bad_knobs_are_user_errors() -> None:
    with pytest.raises(SpoUserError, match="max_start"):
        arith.make_problem(random.Random(0), 2, max_start=50, max_val=20)
    with pytest.raises(SpoUserError, match="max_mul"):
        arith.make_problem(random.Random(0), 2, max_mul=1)
    with pytest.raises(SpoUserError, match="min_steps"):
        arith.sample_problems(random.Random(0), 1, 3, 2, set())
