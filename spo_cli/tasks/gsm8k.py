"""GSM8K in the reference's original format: prompt template, gold answers, and the reward.

Reference: `src/treetune/tasks/gsm8k.py` with `use_original_format: true` and `MATHRewardFunction`
(docs/tasks.md#gsm8k). The synthetic arithmetic task reuses
`reward` because it answers in the same "#### <answer>" format.
"""

from __future__ import annotations

import re

from spo_cli.errors import SpoUserError

# Rho-1B SFT template (docs/tasks.md#gsm8k-prompt); the question is stripped before formatting.
PROMPT_TEMPLATE = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
# Stop string used for sampling (docs/tasks.md#gsm8k-prompt): the SFT model starts a new problem after three newlines.
STOP = "\n\n\nProblem:"

ANSWER_MARK = "####"

# Calculator annotations look like `<<48/2=24>>`; they never nest.
_CALCULATOR_RE = re.compile(r"<<.*?>>")


def format_prompt(question: str) -> str:
    """The sampling prompt for one GSM8K question (question stripped, as the reference does)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def clean_solution(solution: str) -> str:
    """The worked solution with calculator annotations `<<...>>` removed (SFT/gold text, docs/tasks.md#gsm8k-prompt)."""
    return _CALCULATOR_RE.sub("", solution)


def gold_answer(solution: str) -> str:
    """The gold final answer: text after the last "####", stripped, thousands commas removed.

    The local data has answers like "#### 1,000"; the reward compares against the comma-free form.
    Raises SpoUserError if the solution has no "####".
    """
    if ANSWER_MARK not in solution:
        raise SpoUserError(f"GSM8K solution has no '{ANSWER_MARK} <answer>' line: {solution[-200:]!r}")
    return solution.rsplit(ANSWER_MARK, 1)[1].strip().replace(",", "")


def extract_answer(response: str) -> str | None:
    """The predicted answer: text after the LAST "####", stripped; None if absent or empty."""
    if ANSWER_MARK not in response:
        return None
    answer = response.rsplit(ANSWER_MARK, 1)[1].strip()
    return answer or None


def reward(response: str, gold: str) -> float:
    """Reference GSM8K reward (docs/tasks.md#gsm8k-reward): -2.0, 0.0 or 1.0.

    - more than one "####" -> -2.0 (multiple conclusions), checked before anything else;
    - no extracted answer -> 0.0 ("unfinished");
    - else 1.0 iff `answer.strip().replace(",", "").lower() == gold.strip().lower()`, so "18.0",
      "$18" and "18 dollars" are wrong against gold "18".

    Truncation is NOT handled here: callers that follow the reference give R = 0 to responses whose
    finish_reason is "length" (chain trajectories, MC rollouts), overriding even 1.0 or -2.0.
    """
    if response.count(ANSWER_MARK) > 1:
        return -2.0
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if answer.strip().replace(",", "").lower() == gold.strip().lower() else 0.0
