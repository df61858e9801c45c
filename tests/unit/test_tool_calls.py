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


def test_a_worked_solution_splits_where_the_loop_appends_outputs():
    from spo_cli.tools.calls import split_tool_outputs

    policy = "17*23: <code>print(17*23)</code>"
    tool = output_block(policy, "391\n", RETOOL)
    text = policy + tool + "so #### 391"
    assert split_tool_outputs(text, RETOOL) == [(policy, False), (tool, True), ("so #### 391", False)]
    # two calls, the second right after the first output; no text after the last
    two = "<code>a</code>" + output_block("x</code>", "1", RETOOL) + "<code>b</code>" + output_block("</code>", "", RETOOL)
    assert [flag for _, flag in split_tool_outputs(two, RETOOL)] == [False, True, False, True]
    assert "".join(piece for piece, _ in split_tool_outputs(two, RETOOL)) == two
    assert split_tool_outputs("no calls", RETOOL) == [("no calls", False)]


def test_a_warm_start_does_not_train_tool_outputs():
    from types import SimpleNamespace

    from spo_cli.models import build_byte_tokenizer
    from spo_cli.sft import encode_examples

    tokenizer = build_byte_tokenizer()
    task = SimpleNamespace(format_prompt=lambda q: q, use_chat_template=False)
    policy = "<code>print(2)</code>"
    tool = output_block(policy, "2", RETOOL)
    problem = SimpleNamespace(question="Q", solution=policy + tool + "#### 2")
    (prompt,), (ids,), (mask,) = encode_examples(tokenizer, task, [problem], RETOOL)
    assert tokenizer.decode(ids[:-1]) == problem.solution and ids[-1] == tokenizer.eos_token_id
    assert mask == [1.0] * len(policy) + [0.0] * len(tool) + [1.0] * len("#### 2") + [1.0]
    # without tools every solution token is trained, as before
    assert encode_examples(tokenizer, task, [problem])[2] == [[1.0] * len(ids)]


def test_the_calculator_solution_is_what_a_calling_response_reads_like():
    from spo_cli.tasks.arith import first_error, with_calculator

    solution = "12*34=408\n408+5=413\n#### 413"
    worked = with_calculator(solution, RETOOL)
    call = "<code>print(12*34)</code>"
    assert worked == call + "\n<interpreter>\n408\n</interpreter>\n12*34=408\n408+5=413\n#### 413"
    assert code_to_run(call, RETOOL) == "print(12*34)"
    # first_error reads a calling response against it: a wrong copy of the tool's result departs at that digit
    wrong = worked.replace("12*34=408", "12*34=418")
    assert first_error(wrong, worked) == worked.index("12*34=408") + len("12*34=4")
    assert first_error(worked, worked) is None
    # every operation through the tool: each worked line follows its call
    every = with_calculator("12*34=408\n408-5=403\n#### 403", RETOOL, "+-*")
    sub = "<code>print(408-5)</code>\n<interpreter>\n403\n</interpreter>\n408-5=403"
    assert every == call + "\n<interpreter>\n408\n</interpreter>\n12*34=408\n" + sub + "\n#### 403"
    assert with_calculator("7+5=12\n#### 12", RETOOL, "*") == "7+5=12\n#### 12"


def test_the_calculator_task_needs_default_tool_markers(tmp_path):
    import pytest as _pytest

    from spo_cli.errors import SpoUserError
    from spo_cli.recipe import parse_recipe

    base = {"model": {"kind": "tiny"}, "task": {"kind": "arith", "calculator": ["*"]}}
    with _pytest.raises(SpoUserError, match="set a sampling.tools section"):
        parse_recipe(base)
    with _pytest.raises(SpoUserError, match="default tool markers"):
        parse_recipe({**base, "sampling": {"tools": {"code_start": "```python\n"}}})
    assert parse_recipe({**base, "sampling": {"tools": {}}}).task.calculator == ["*"]
    with _pytest.raises(SpoUserError, match="task.calculator"):
        parse_recipe({**base, "task": {"kind": "arith", "calculator": ["/"]}, "sampling": {"tools": {}}})


def test_tool_metrics_count_calls_and_failures():
    from spo_cli.episode import Episode
    from spo_cli.sample.episodes import tool_metrics

    def episode(calls):
        return Episode(id="e", group_id="g", prompt="p", response="r", prompt_token_ids=[1], response_token_ids=[2],
                       finish_reason="stop", metadata={"tool_calls": calls} if calls else {})  # fmt: skip

    metrics = tool_metrics([episode(["ok", "error"]), episode(["ok"]), episode([]), episode(["timeout"])])
    assert metrics == {"tools/call_frequency": 1.0, "tools/failure_frequency": 0.5}
    assert tool_metrics([episode([])]) == {"tools/call_frequency": 0.0, "tools/failure_frequency": 0.0}


def test_a_calculator_rate_below_one_mixes_called_and_plain_lines():
    import random

    from spo_cli.tasks.arith import with_calculator, without_calls

    solution = "\n".join(f"{k}*2={2 * k}" for k in range(10, 50)) + "\n#### 98"
    mixed = with_calculator(solution, RETOOL, "*", rate=0.5, rng=random.Random(0))
    calls = mixed.count("<code>")
    assert 10 <= calls <= 30, calls  # about half of the 40 lines
    assert without_calls(mixed, RETOOL) == solution and without_calls(with_calculator(solution, RETOOL), RETOOL) == solution
    assert with_calculator(solution, RETOOL, "*", rate=1.0) == with_calculator(solution, RETOOL)


def test_calculator_first_error_accepts_a_line_with_or_without_its_call():
    from spo_cli.tasks.arith import calculator_first_error, with_calculator

    solution = with_calculator("12*34=408\n408+5=413\n#### 413", RETOOL, "*+")
    in_head = "12*34=408\n408+5=413\n#### 413"
    assert calculator_first_error(in_head, solution, RETOOL, "*+") is None
    assert calculator_first_error(solution, solution, RETOOL, "*+") is None
    wrong = "12*34=408\n408+5=414\n#### 414"
    assert calculator_first_error(wrong, solution, RETOOL, "*+") == len("12*34=408\n408+5=41")
    # a wrong copy of the tool's output departs at its digit
    called_wrong = solution.replace("12*34=408\n", "12*34=418\n", 1)
    assert calculator_first_error(called_wrong, solution, RETOOL, "*+") == solution.index("12*34=408\n") + len("12*34=4")
