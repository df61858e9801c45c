"""Finding the code of a tool call in a response, and the block appended after it (hand-written cases)."""

from __future__ import annotations

import pytest

from spo_cli.tools.calls import ToolMarkers, code_to_run, output_block

RETOOL = ToolMarkers()
FENCED = ToolMarkers(code_start="```python\n", code_end="```\n", output_start="```output", output_end="```")


@pytest.mark.parametrize(
    "text,code",
    [
        ("Let me compute.\n<code>\nprint(17 * 23)\n</code>", "print(17 * 23)"),
        ("<code>\n```python\nx = 2\nprint(x ** 10)\n```\n</code>\n", "x = 2\nprint(x ** 10)"),
        ("<code>```py\nprint(1)```</code>", "print(1)"),
        # the last block is the call; an earlier, answered one is not run again
        ("<code>print(1)</code>\n<interpreter>\n1\n</interpreter>\nNow <code>print(2)</code>", "print(2)"),
        ("<code>print('</code')</code>", "print('</code')"),
        ("no call here", None),
        ("</code> without a start", None),
        ("<code>print(3)", None),
    ],
)
def test_code_to_run(text, code):
    assert code_to_run(text, RETOOL) == code


def test_markdown_fences_as_markers():
    text = "Compute:\n```python\nprint(6 * 7)\n```\n"
    assert code_to_run(text, FENCED) == "print(6 * 7)"


def test_output_block_on_lines_of_its_own():
    assert output_block("<code>print(42)</code>", "42\n", RETOOL) == "\n<interpreter>\n42\n</interpreter>\n"
    assert output_block("<code>x</code>\n", "", RETOOL) == "<interpreter>\n</interpreter>\n"
    assert output_block("</code>\n", "Traceback ...\nNameError", RETOOL) == (
        "<interpreter>\nTraceback ...\nNameError\n</interpreter>\n"
    )
