"""Where a tool call is in a response and what is appended after it (docs/tools.md#the-call-format): text in,
text out, no sampling and no sandbox here.

The default markers are ReTool's (the setting of single-stream SPO's verl recipe): the model writes
`<code>` ... `</code>` around its Python, optionally inside a ```python fence, and the sandbox's output comes back
between `<interpreter>` and `</interpreter>`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

FENCE = re.compile(r"\A\s*```[A-Za-z0-9_+-]*[ \t]*\n(?P<code>.*?)\n?[ \t]*```\s*\Z", re.S)


@dataclass(frozen=True)
class ToolMarkers:
    code_start: str = "<code>"
    code_end: str = "</code>"
    output_start: str = "<interpreter>"
    output_end: str = "</interpreter>"


def tool_markers(tools) -> ToolMarkers | None:
    """The markers of a recipe's `sampling.tools` section (None without tools)."""
    if tools is None:
        return None
    return ToolMarkers(tools.code_start, tools.code_end, tools.output_start, tools.output_end)


def code_to_run(text: str, markers: ToolMarkers) -> str | None:
    """The code of the call that `text` (a response so far, stopped at `markers.code_end`) closes: what lies
    between the last `code_start` and the last `code_end`, without a surrounding ``` fence. The token that
    completed `code_end` may carry a few more characters (e.g. a newline); they are ignored. None when `text`
    closes no code block (no `code_end`, or no `code_start` before it)."""
    end = text.rfind(markers.code_end)
    if end < 0:
        return None
    start = text.rfind(markers.code_start, 0, end)
    if start < 0:
        return None
    body = text[start + len(markers.code_start) : end]
    fenced = FENCE.match(body)
    if fenced is not None:
        body = fenced.group("code")
    return body.strip("\n")


def output_block(text_so_far: str, output: str, markers: ToolMarkers) -> str:
    """The text appended after a call: the output between the output markers, on lines of their own."""
    separator = "" if text_so_far.endswith("\n") else "\n"
    body = output if output.endswith("\n") or not output else output + "\n"
    return f"{separator}{markers.output_start}\n{body}{markers.output_end}\n"


def split_tool_outputs(text: str, markers: ToolMarkers) -> list[tuple[str, bool]]:
    """`text` (a worked solution with calls) as (piece, written_by_a_tool) pieces, cut where the tool loop would
    have appended each output: an output block is `output_block`'s text, starting with the newline it adds when
    the policy's text before it (a call's `code_end`) does not end with one. Tokenizing the pieces one by one gives
    the tokens the loop produces, so a warm start trains on what sampling will show."""
    pieces: list[tuple[str, bool]] = []
    position = 0
    while (start := text.find(markers.output_start, position)) >= 0:
        end = text.find(markers.output_end, start + len(markers.output_start))
        if end < 0:
            break
        end += len(markers.output_end)
        if text.startswith("\n", end):
            end += 1
        if start > 0 and text[start - 1] == "\n" and text[:start - 1].endswith(markers.code_end):
            start -= 1
        if start > position:
            pieces.append((text[position:start], False))
        pieces.append((text[start:end], True))
        position = end
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def tool_call_metrics(calls: Sequence[Sequence[str]]) -> dict[str, float]:
    """TRL's tool metrics from each response's call statuses: calls per response, and the fraction of calls that
    did not end `ok` (an error, a timeout, too much output, the sandbox failing)."""
    statuses = [status for response in calls for status in response]
    failed = sum(1 for status in statuses if status != "ok")
    return {
        "tool_call_frequency": len(statuses) / len(calls) if calls else 0.0,
        "tool_failure_frequency": failed / len(statuses) if statuses else 0.0,
    }
