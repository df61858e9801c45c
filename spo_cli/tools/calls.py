"""Where a tool call is in a response and what is appended after it (docs/tools.md#the-call-format): text in,
text out, no sampling and no sandbox here.

The default markers are ReTool's (the setting of single-stream SPO's verl recipe): the model writes
`<code>` ... `</code>` around its Python, optionally inside a ```python fence, and the sandbox's output comes back
between `<interpreter>` and `</interpreter>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FENCE = re.compile(r"\A\s*```[A-Za-z0-9_+-]*[ \t]*\n(?P<code>.*?)\n?[ \t]*```\s*\Z", re.S)


@dataclass(frozen=True)
class ToolMarkers:
    code_start: str = "<code>"
    code_end: str = "</code>"
    output_start: str = "<interpreter>"
    output_end: str = "</interpreter>"


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
