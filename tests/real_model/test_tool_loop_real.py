"""The tool loop with a real model: asked to compute with Python, SmolLM2-135M-Instruct writes a fenced code
block on its own; the sandbox runs it, its output is appended as tool tokens and the model goes on to use it."""

from __future__ import annotations

import pytest

from ..conftest import REAL_MODEL, REAL_MODEL_MISSING

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not (REAL_MODEL / "config.json").is_file(), reason=REAL_MODEL_MISSING),
]

# The model's own habit: ```python ... ``` blocks (the closing fence on a line of its own ends a call).
FENCES = dict(code_start="```python\n", code_end="\n```\n", output_start="```output", output_end="```")
QUESTION = "Compute 1234 * 5678 with Python."


def tool_completions(backend_sampler, tokenizer):
    from spo_cli.sample import SamplingParams
    from spo_cli.sample.tools import ToolLoopSampler
    from spo_cli.tasks import apply_template
    from spo_cli.tools.calls import ToolMarkers
    from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

    loop = ToolLoopSampler(backend_sampler, tokenizer, LocalSandbox(SandboxLimits()), ToolMarkers(**FENCES), 2)
    prompt = apply_template(tokenizer, QUESTION, True)
    (group,) = loop.generate([prompt], SamplingParams(n=4, temperature=0.7, max_new_tokens=96), seed=0)
    return group


def check_real_calls(group, tokenizer) -> None:
    called = [c for c in group if c.tool_calls == ["ok"] and "print(" in c.text]
    assert called, [c.text for c in group]
    for c in called:
        (start, end) = c.tool_spans[0]
        assert tokenizer.decode(c.token_ids[start:end]).startswith("```output\n")
        assert c.logprobs[start:end] == [0.0] * (end - start) and all(lp < 0 for lp in c.logprobs[:start][-3:])
    # the program printed the true product, and the model wrote on after it
    assert any("7006652" in tokenizer.decode(c.token_ids[s:e]) and e < len(c.token_ids)
               for c in called for s, e in c.tool_spans)  # fmt: skip


def test_hf_sampling_with_a_python_tool():
    from spo_cli.hardware import Runtime
    from spo_cli.models import load_checkpoint
    from spo_cli.sample.hf import HFSampler

    model, tokenizer = load_checkpoint(REAL_MODEL)
    group = tool_completions(HFSampler(model.eval(), tokenizer, Runtime("cpu", bf16=False)), tokenizer)
    check_real_calls(group, tokenizer)
