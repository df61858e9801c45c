"""MATH prompt/gold helpers and the math-verify grader (process pool, usable from any thread)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.tasks import math as math_task

SHARED_DATA = Path(__file__).parents[3] / ".." / "shared" / "data"
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
MATH_TEST = SHARED_DATA / "math" / "test.jsonl"


@pytest.fixture(scope="module")
def grader():
    with math_task.MathGrader(num_workers=2) as grader:
        yield grader


def test_last_boxed() -> None:
    assert math_task.last_boxed(r"so $\boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert math_task.last_boxed(r"\boxed{1} then \boxed{\{2, 3\}}") == r"\{2, 3\}"
    assert math_task.last_boxed(r"\boxed{a} and \fbox{b}") == "b"
    assert math_task.last_boxed(r"answer: $\boxed 5$.") == "5"
    assert math_task.last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced
    assert math_task.last_boxed("no box here") is None


def test_gold_answer_prefers_answer_field() -> None:
    assert math_task.gold_answer({"answer": "025", "solution": r"\boxed{25}"}) == "025"
    assert math_task.gold_answer({"answer": 204}) == "204"
    assert math_task.gold_answer({"solution": r"Thus $\boxed{\frac{\pi}{2}}$."}) == r"\frac{\pi}{2}"
    with pytest.raises(SpoUserError, match="no `answer` field"):
        math_task.gold_answer({"problem": "p", "solution": "no box"})


@pytest.mark.skipif(not MATH_TEST.exists(), reason=f"{MATH_TEST} not present")
def test_gold_answer_on_math_test_record() -> None:
    first = json.loads(MATH_TEST.read_text(encoding="utf-8").splitlines()[0])
    assert "answer" not in first
    assert math_task.gold_answer(first) == "2"


def test_r1_prompt_template() -> None:
    prompt = math_task.format_r1_prompt("What is $1+1$?")
    assert prompt.startswith(
        "<｜begin▁of▁sentence｜><｜User｜>Solve the following math problem efficiently and clearly.  The last"
    )
    assert "format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without" in prompt
    assert prompt.endswith("Think step by step before answering.\n\nWhat is $1+1$?<｜Assistant｜><think>\n")


# What math-verify 0.9 says on the edge cases (gold wrapped in $...$, boxed-priority prediction).
EDGE_CASES = [
    (r"The answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0),
    ("0.5", r"\frac12", 1.0),  # numeric equality: a decimal matches the fraction
    (r"\boxed{0.5}", r"\frac12", 1.0),
    (r"so $\boxed{3}$", "4", 0.0),
    (r"\boxed{25}", "025", 1.0),  # AIME zero-padded gold
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    ("", "5", 0.0),
    # Several boxes: an intermediate result boxed in an earlier paragraph does not count, the last box does...
    ("First \\boxed{2}.\n\nThus the final answer is \\boxed{3}.", "3", 1.0),
    ("First \\boxed{2}.\n\nThus the final answer is \\boxed{3}.", "2", 0.0),
    # ...but boxes within one sentence are one answer with several values (MATH's "2, 3" answers).
    (r"x is \boxed{2} and y is \boxed{3}", "2, 3", 1.0),
    (r"\boxed{2}, \boxed{3}", "3", 0.0),
]


def test_grader_edge_cases(grader: math_task.MathGrader) -> None:
    responses, golds, expected = zip(*EDGE_CASES)
    assert grader.grade(list(responses), list(golds)) == list(expected)
    assert grader.grade([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        grader.grade(["a", "b"], ["a"])


def test_grader_from_a_thread(grader: math_task.MathGrader) -> None:
    results, errors = [], []

    def work() -> None:
        try:
            results.append(grader.grade([r"\boxed{\frac{1}{2}}", r"\boxed{7}"], [r"\frac{1}{2}", "8"]))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [[1.0, 0.0], [1.0, 0.0]]


def test_module_reward_in_main_thread_and_in_a_thread() -> None:
    assert math_task.reward(r"\boxed{25}", "025") == 1.0
    assert math_task.reward(r"\boxed{24}", "025") == 0.0
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(math_task.reward(r"\boxed{\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert out == [1.0]


@pytest.mark.skipif(not MATH500.exists(), reason=f"{MATH500} not present")
def test_math500_reference_solutions_grade_correct(grader: math_task.MathGrader) -> None:
    records = [json.loads(line) for line in MATH500.read_text(encoding="utf-8").splitlines()[:40]]
    golds = [math_task.gold_answer(record) for record in records]
    solutions = [record["solution"] for record in records]
    assert grader.grade(solutions, golds) == [1.0] * len(records)
    # Shifted by one, nearly all pairs are wrong (neighbours can share an answer).
    assert sum(grader.grade(solutions[1:], golds[:-1])) <= 3


def test_hung_item_is_killed_and_pool_recovers() -> None:
    # With math-verify's own limits off, 2^(2^30) vs 5 takes ~9 s of sympy work in the worker: only
    # the backstop stops it. Neighbours still get graded, by a fresh pool.
    # What shows the backstop fired is the pool it killed, not the wall time (that depends on the machine's load:
    # a CI run beside other work once took 6.3 s).
    with math_task.MathGrader(timeout_s=None, num_workers=2, backstop_s=1.0) as grader:
        first_pool = grader._get_pool()
        responses = [r"\boxed{2}", r"\boxed{2^{2^{30}}}", r"\boxed{3}", r"\boxed{4}"]
        scores = grader.grade(responses, ["2", "5", "3", "5"])
        assert scores == [1.0, 0.0, 1.0, 0.0]
        assert grader._pool is not first_pool, "the hung item's pool must have been killed and replaced"
        assert grader.grade([r"\boxed{9}"], ["9"]) == [1.0]


def test_math_verify_time_limit_works_in_workers() -> None:
    # The same slow item under math-verify's own 1 s limit: it fails inside the worker (signal.alarm
    # works there), so the pool survives and the item behind it is graded normally.
    with math_task.MathGrader(timeout_s=1, num_workers=1, backstop_s=30) as grader:
        pool = grader._get_pool()
        assert grader.grade([r"\boxed{2^{2^{30}}}", r"\boxed{5}"], ["5", "5"]) == [0.0, 1.0]
        assert grader._pool is pool, "math-verify's own limit stopped it, not the backstop (which kills the pool)"
