"""Reasoning-step partition (VinePPO baseline, docs/algorithms.md#step-partition): one segment per solution line."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Sequence

_STEP_DELIMITER = "\n"
_ANSWER_PREFIX = "\n#### "


def step_char_starts(text: str) -> list[int]:
    """Character index at which each reasoning step of a GSM8K-style solution starts.

    The rule of VinePPO's ``GSM8K.split_solution_into_intermediate_steps``:

    * Only the part before the first ``"\\n#### "`` is split (the whole text if there is
      none); it is split on ``"\\n"``, and the ``"\\n"`` belongs to the *start* of the
      following step, so the steps cover the text exactly.
    * A piece is blank when ``piece.strip() == ""`` (the reference's test, so a line of
      spaces counts as empty).
    * Blank pieces before the first non-blank one are merged into the first step.
    * The last non-blank piece is merged with everything after it: trailing blank pieces,
      ``"\\n#### <answer>"`` and any further text.
    * Blank pieces between two non-blank ones are merged into the *following* step, so
      ``"a\\n\\nb"`` has steps ``"a"`` and ``"\\n\\nb"`` (starts ``[0, 1]``).
    * A text without any non-blank piece (e.g. ``"\\n\\n"`` or ``"\\n#### 5"``) is a single
      step.

    Where this departs from the reference
    (docs/reference_differences.md#step-partition-blank-lines-and-answer-markers): the reference
    keeps each middle empty line as a step of its own (a state that differs from the previous
    one only by a newline, not worth a value estimate); without an answer marker it leaves
    trailing empty lines as steps too; and it fails on a text with two ``"\\n#### "`` markers,
    where here everything from the first one on belongs to the last step.

    Args:
        text (str): the decoded response.

    Returns:
        list[int]: strictly increasing character indices, the first always ``0``;
        ``[]`` for an empty text. ``"a=1\\nb=2\\n#### 3" -> [0, 3]``.
    """
    if not text:
        return []
    answer_at = text.find(_ANSWER_PREFIX)
    body = text if answer_at < 0 else text[:answer_at]
    starts: list[int] = []
    blank_run_start: int | None = None
    content_at = 0
    for i, piece in enumerate(body.split(_STEP_DELIMITER)):
        # The delimiter before a piece belongs to that piece's step.
        opens_at = content_at - len(_STEP_DELIMITER) if i else 0
        if piece.strip():
            if not starts:
                starts.append(0)
            else:
                starts.append(opens_at if blank_run_start is None else blank_run_start)
            blank_run_start = None
        elif blank_run_start is None:
            blank_run_start = opens_at
        content_at += len(piece) + len(_STEP_DELIMITER)
    return starts or [0]


def step_boundaries(step_starts: Sequence[int], prefix_chars: Callable[[int], int], num_tokens: int) -> list[int]:
    """Map step start characters to the response-token indices that open each step.

    A token belongs to the step containing its first character, so the first token of
    step ``k`` is the smallest ``t < num_tokens`` with ``prefix_chars(t) >= step_starts[k]``.
    That ``t`` is found by binary search, because ``prefix_chars`` usually decodes a token
    prefix (about ``log2(num_tokens)`` calls per step, memoised across steps).

    Args:
        step_starts (Sequence[int]): strictly increasing, non-negative character indices
            of the steps, e.g. from :func:`step_char_starts`; shape ``[S]``.
        prefix_chars (Callable[[int], int]): ``t -> len(decode(response_token_ids[:t]))``;
            must be non-decreasing in ``t`` with ``prefix_chars(0) == 0``.
        num_tokens (int): number of response tokens ``L``, ``>= 0``.

    Returns:
        list[int]: strictly increasing token indices in ``[0, L)``, always starting with
        ``0`` when ``L > 0``; ``[]`` when ``L == 0``. Steps that start inside the same token
        collapse to one boundary (the next token, which then belongs to the later step),
        and steps that start after the first character of the last token get none. The
        result may therefore have fewer entries than ``step_starts``.

    Raises:
        ValueError: if ``num_tokens < 0`` or ``step_starts`` is not strictly increasing
            and non-negative.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if step_starts and step_starts[0] < 0:
        raise ValueError(f"step_starts must be non-negative, got {list(step_starts)}")
    for prev, cur in zip(step_starts, step_starts[1:]):
        if cur <= prev:
            raise ValueError(f"step_starts must be strictly increasing, got {list(step_starts)}")
    if num_tokens == 0:
        return []
    chars_before = functools.cache(prefix_chars)
    boundaries = [0]
    tokens = range(num_tokens)
    for start in step_starts:
        # Steps are ascending, so the search can begin at the last boundary found.
        t = bisect.bisect_left(tokens, start, lo=boundaries[-1], key=chars_before)
        if t == num_tokens:
            break
        if t > boundaries[-1]:
            boundaries.append(t)
    return boundaries
