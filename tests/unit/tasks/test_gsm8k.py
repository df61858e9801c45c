"""GSM8K reward semantics (docs/tasks.md#gsm8k-reward) and gold parsing on the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.tasks import gsm8k

GSM8K_TEST = Path(__file__).parents[3] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", 1.0),
        ("#### 17", "18", 0.0),
        ("#### 18.0", "18", 0.0),
        ("#### $18", "18", 0.0),
        ("#### 18 dollars", "18", 0.0),
        ("#### 1,000", "1000", 1.0),
        ("#### 1000", "1000", 1.0),
        ("#### -3", "-3", 1.0),
        ("####18", "18", 1.0),  # no space needed after the mark
        ("#### 18\n", "  18 ", 1.0),  # both sides stripped
        ("#### ABC", "abc", 1.0),  # case-insensitive
        ("#### 18\n#### 18", "18", -2.0),  # two conclusions, even if both right
        ("#### 17 #### 18", "18", -2.0),
        ("####\n####", "18", -2.0),  # -2 wins over "no answer"
        ("The answer is 18.", "18", 0.0),  # no "####": unfinished
        ("#### ", "18", 0.0),  # nothing after the mark: unfinished
        ("", "18", 0.0),
    ],
)
def test_reward(response: str, gold: str, expected: float) -> None:
    assert gsm8k.reward(response, gold) == expected


def test_extract_answer_takes_text_after_last_mark() -> None:
    assert gsm8k.extract_answer("a\n#### 42 \n") == "42"
    assert gsm8k.extract_answer("#### 1 then #### 2") == "2"
    assert gsm8k.extract_answer("no mark") is None
    assert gsm8k.extract_answer("####   \n") is None


def test_clean_solution_removes_calculator_annotations() -> None:
    raw = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k.clean_solution(raw) == "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"


def test_gold_answer_strips_commas_and_requires_mark() -> None:
    assert gsm8k.gold_answer("so\n#### 1,000") == "1000"
    assert gsm8k.gold_answer("x #### 5 #### 7 ") == "7"
    with pytest.raises(SpoUserError, match="####"):
        gsm8k.gold_answer("no final answer line")


def test_prompt_template_strips_question() -> None:
    assert gsm8k.format_prompt("  How many?\n") == "[MATH_TASK] Problem:\nHow many?\n\nSolution:"
    assert gsm8k.STOP == "\n\n\nProblem:"


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_gold_answer_on_real_data() -> None:
    lines = GSM8K_TEST.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert gsm8k.gold_answer(first["answer"]) == "18"
    # The reference solution, cleaned, earns full reward against its own gold.
    assert gsm8k.reward(gsm8k.clean_solution(first["answer"]), gsm8k.gold_answer(first["answer"])) == 1.0
    with_comma = next(json.loads(line) for line in lines if "," in line.rsplit("####", 1)[-1])
    gold = gsm8k.gold_answer(with_comma["answer"])
    assert "," not in gold and gold.lstrip("-").isdigit()
    assert gsm8k.reward(with_comma["answer"], gold) == 1.0
