"""The tool loop with a real model: asked to compute with Python, SmolLM2-135M-Instruct writes a fenced code
block on its own; the sandbox runs it, its output is appended as tool tokens and the model goes on to use it."""

from __future__ import annotations

import pytest

from spo_cli.tools.calls import ToolMarkers, code_to_run, output_block

from ..conftest import REAL_MODEL, REAL_MODEL_MISSING

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not (REAL_MODEL / "config.json").is_file(), reason=REAL_MODEL_MISSING),
]

# The model's own habit: ```python ... ``` blocks (the closing fence on a line of its own ends a call).
FENCES = dict(code_start="```python\n", code_end="\n```\n", output_start="```output", output_end="```")
QUESTION = "Compute 1234 * 5678 with Python."


def tool_loop(backend_sampler, tokenizer, max_tool_calls: int = 2):
    from spo_cli.sample.tools import ToolLoopSampler
    from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

    sandbox = LocalSandbox(SandboxLimits())
    return ToolLoopSampler(backend_sampler, tokenizer, sandbox, ToolMarkers(**FENCES), max_tool_calls)


def tool_completions(backend_sampler, tokenizer):
    from spo_cli.sample import SamplingParams
    from spo_cli.tasks import apply_template

    loop = tool_loop(backend_sampler, tokenizer)
    prompt = apply_template(tokenizer, QUESTION, True)
    # At temperature 0.7, 3 of 20 samples measured wrote a block that ran: among 16, none does with probability
    # about 7% at that rate, so the test depends little on which random stream the sampler draws (the seed is fixed).
    (group,) = loop.generate([prompt], SamplingParams(n=16, temperature=0.7, max_new_tokens=96), seed=0)
    return group


def program_output(c, tokenizer) -> str:
    """What the program of `c`'s first call prints, run again on its own in a fresh sandbox."""
    from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

    start, _ = c.tool_spans[0]
    code = code_to_run(tokenizer.decode(c.token_ids[:start]), ToolMarkers(**FENCES))
    result = LocalSandbox(SandboxLimits()).run(code)
    assert result.status == "ok", result
    return result.output


def check_real_calls(group, tokenizer) -> None:
    called = [c for c in group if c.tool_calls == ["ok"]]
    assert called, [c.text for c in group]
    for c in called:
        (start, end) = c.tool_spans[0]
        shown = tokenizer.decode(c.token_ids[start:end])
        assert c.logprobs[start:end] == [0.0] * (end - start) and all(lp < 0 for lp in c.logprobs[:start][-3:])
        # The tool tokens hold what the model's own program prints; an output that did not fit in the response's
        # budget is cut, and the response ends there.
        printed = program_output(c, tokenizer)
        if end == len(c.token_ids) and c.finish_reason == "length":
            assert output_block("\n", printed, ToolMarkers(**FENCES)).startswith(shown), shown
        else:
            assert shown.startswith("```output\n") and printed.strip() in shown, shown
    assert any(e < len(c.token_ids) for c in called for _, e in c.tool_spans), "the model writes on after an output"


@pytest.fixture(scope="module")
def hf_backend():
    from spo_cli.hardware import Runtime
    from spo_cli.models import load_checkpoint
    from spo_cli.sample.hf import HFSampler

    model, tokenizer = load_checkpoint(REAL_MODEL)
    return HFSampler(model.eval(), tokenizer, Runtime("cpu", bf16=False)), tokenizer


@pytest.fixture(scope="module")
def hf_group(hf_backend):
    return tool_completions(*hf_backend)


def test_hf_sampling_with_a_python_tool(hf_backend, hf_group):
    check_real_calls(hf_group, hf_backend[1])


class Recording:
    """A sampler that keeps every completion its inner sampler returns (what the Monte Carlo rollouts wrote)."""

    def __init__(self, inner):
        self.inner, self.completions, self.calls_made = inner, [], []

    def generate_ids(self, prompt_ids, params, seed, offset=0, caps=None, calls_made=None):
        groups = self.inner.generate_ids(prompt_ids, params, seed, offset, caps, calls_made=calls_made)
        self.completions.append(groups)
        self.calls_made.append(calls_made)
        return groups


def test_spo_chain_rollouts_through_a_tool_call(hf_backend, hf_group):
    # SPO-chain on an episode that called the tool: cutpoints on its real log-probabilities never fall in the tool's
    # output, a state after the call carries the call (its rollouts may make only the calls left), and a state
    # inside the code block is continued by rollouts that close the block and run it.
    from spo_cli.episode import Episode
    from spo_cli.estimate import estimate_advantages
    from spo_cli.estimate.mc_chain import state_before
    from spo_cli.estimate.rollout import MonteCarloValues
    from spo_cli.partition import partition_episodes
    from spo_cli.recipe import Arith, Cutpoint, McChain
    from spo_cli.sample import SamplingParams
    from spo_cli.tasks import build_task

    backend, tokenizer = hf_backend
    c = next(c for c in hf_group if c.tool_calls == ["ok"] and c.tool_spans[0][1] < len(c.token_ids) - 4)
    printed = program_output(c, tokenizer).strip()
    episode = Episode(
        id="e", group_id="g", iteration=0, prompt=QUESTION, response=c.text, gold="7006652",
        prompt_token_ids=c.prompt_token_ids, response_token_ids=c.token_ids, response_logprobs=c.logprobs,
        finish_reason=c.finish_reason, tool_spans=c.tool_spans, reward=0.0,
    )  # fmt: skip
    (partitioned,) = partition_episodes([episode], Cutpoint(rho=0.9, interval=2))
    (start, end) = c.tool_spans[0]
    starts = [seg.start for seg in partitioned.segments if seg.is_boundary]
    assert not any(start < b < end for b in starts) and any(b >= end for b in starts), starts

    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=32, logprobs=False)
    rollouts = Recording(tool_loop(backend, tokenizer, max_tool_calls=1))
    values = MonteCarloValues(rollouts, tokenizer, build_task(Arith(), 1), params, 0.0, run_seed=0)
    (estimated,), stats = estimate_advantages([partitioned], McChain(rollouts=2, max_new_tokens=32), values)
    assert stats["mc/unique_states"] == len(starts) and estimated.token_advantages is not None
    after = [i for i, b in enumerate(starts) if b >= end]
    assert [rollouts.calls_made[0][i] for i in after] == [1] * len(after)
    assert all(r.tool_calls == [] for i in after for r in rollouts.completions[0][i]), "no call left after one"

    inside = state_before(episode, start - 2)  # the closing fence is not written yet: the rollout writes it
    values([inside], iteration=0)
    ran = [r for r in rollouts.completions[-1][0] if r.tool_calls]
    # Only the closing fence was left to write: the rollouts run the episode's own program.
    assert ran and any(printed in tokenizer.decode(r.token_ids[s:e]) for r in ran for s, e in r.tool_spans)
