"""The evaluation graders on real data (gold solutions graded against their own answers) and on saved completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_cli.evaluate.benchmarks import grade_gsm8k_rule
from spo_cli.tasks import gsm8k
from spo_cli.tasks import math as math_task

from ...conftest import DATA

HERE = Path(__file__).parent


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name / "test.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grader():
    with math_task.MathGrader(timeout_s=5) as g:
        yield g


def test_gsm8k_gold_solutions_score_100_and_off_by_one_answers_0():
    rows = _rows("gsm8k")
    golds = [gsm8k.gold_answer(r["answer"]) for r in rows]
    graded = grade_gsm8k_rule([r["answer"] for r in rows], golds)
    assert len(rows) == 1319
    assert [g[0] for g in graded] == [1.0] * len(rows)
    assert [g[2] for g in graded] == golds  # the vote key is the compared, comma-free answer
    wrong = grade_gsm8k_rule([f"#### {int(g) + 1}" for g in golds], golds)
    assert [g[0] for g in wrong] == [0.0] * len(rows)


def test_math500_gold_solutions_score_100_and_other_answers_0(grader):
    rows = _rows("math500")
    golds = [math_task.gold_answer(r) for r in rows]
    graded = grader.grade_and_extract([r["solution"] for r in rows], golds)
    assert len(rows) == 500
    assert [g[0] for g in graded] == [1.0] * len(rows)
    assert all(g[1] is not None for g in graded)
    # Wrong: the boxed answer of the next problem whose answer is a different plain value (an "x = 5" would
    # rightly match a gold "5", so equations are skipped).
    plain = [i for i, g in enumerate(golds) if "=" not in g]
    wrong, wrong_golds = [], []
    for k, i in enumerate(plain):
        j = next(plain[(k + s) % len(plain)] for s in range(1, len(plain)) if golds[plain[(k + s) % len(plain)]] != golds[i])
        wrong.append(f"The answer is $\\boxed{{{golds[j]}}}$.")
        wrong_golds.append(golds[i])
    assert len(wrong) > 400
    assert [g[0] for g in grader.grade_and_extract(wrong, wrong_golds)] == [0.0] * len(wrong)


def test_aime24_boxed_answers_score_100(grader):
    rows = _rows("aime24")
    golds = [math_task.gold_answer(r) for r in rows]
    assert all(len(g) == 3 for g in golds)  # zero-padded strings, compared as numbers
    graded = grader.grade_and_extract([f"\\boxed{{{int(g)}}}" for g in golds], golds)
    assert [g[0] for g in graded] == [1.0] * len(rows)
    wrong = grader.grade_and_extract([f"\\boxed{{{int(g) + 1}}}" for g in golds], golds)
    assert [g[0] for g in wrong] == [0.0] * len(rows)


def test_saved_completions_grade_as_recorded(grader):
    cases = [json.loads(line) for line in (HERE / "graded_completions.jsonl").read_text().splitlines()]
    for grader_name in ("gsm8k", "math"):
        rows = [c for c in cases if c["grader"] == grader_name]
        responses, golds = [c["response"] for c in rows], [c["gold"] for c in rows]
        graded = grade_gsm8k_rule(responses, golds) if grader_name == "gsm8k" else grader.grade_and_extract(responses, golds)
        assert [g[0] >= 1.0 for g in graded] == [c["correct"] for c in rows], grader_name
        assert [g[1] for g in graded] == [c["answer"] for c in rows], grader_name


def test_math_vote_keys_make_equal_values_one_answer(grader):
    graded = grader.grade_and_extract(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "so 1/2", "\\boxed{\\dfrac12}"], ["1/2"] * 4)
    assert [g[0] for g in graded] == [1.0] * 4
    assert graded[0][2] == graded[2][2] == graded[3][2]
