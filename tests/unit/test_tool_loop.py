"""The tool loop's bookkeeping with a scripted policy: an inner sampler that writes given text for each turn (cut
by the real `finish_response`, so stop strings and budgets behave as in the backends), the byte tokenizer (one
token per character, so positions are easy to check) and the real local sandbox. What a real model writes through
the loop is tested in tests/integration."""

from __future__ import annotations

import pytest

from spo_cli.models import build_byte_tokenizer
from spo_cli.sample import Completion, SamplingParams, finish_response
from spo_cli.sample.tools import ToolLoopSampler
from spo_cli.tools.calls import ToolMarkers
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits


class ScriptedPolicy:
    """Writes script[turn] for every request of a call, where turn = tool outputs already in the request."""

    def __init__(self, tokenizer, script: list[str]):
        self.tokenizer, self.script = tokenizer, script
        self.calls: list[dict] = []

    def shard_unit(self, params):
        return 1

    def generate_ids(self, prompt_ids, params, seed, offset=0, caps=None):
        self.calls.append({"requests": len(prompt_ids), "seed": seed, "caps": caps, "n": params.n})
        groups = []
        for i, ids in enumerate(prompt_ids):
            turn = self.tokenizer.decode(ids).count("</interpreter>")
            raw = self.tokenizer(self.script[turn], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            budget = params.max_new_tokens if caps is None else min(params.max_new_tokens, caps[i])
            tokens, text, reason = finish_response(self.tokenizer, raw[:budget], params)
            completion = Completion(list(ids), tokens, text, reason, [-0.5] * len(tokens), [0.1] * len(tokens))
            groups.append([completion] * params.n)
        return groups


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def sandbox():
    return LocalSandbox(SandboxLimits(wall_seconds=5.0, cpu_seconds=2.0, output_bytes=400), workers=2)


def loop(tokenizer, sandbox, script, max_tool_calls=2):
    policy = ScriptedPolicy(tokenizer, script)
    return ToolLoopSampler(policy, tokenizer, sandbox, ToolMarkers(), max_tool_calls), policy


def test_a_call_runs_and_its_output_is_tool_tokens(tokenizer, sandbox):
    sampler, policy = loop(tokenizer, sandbox, ["17*23: <code>print(17*23)</code>", "so #### 391"])
    prompt = tokenizer("Q?", add_special_tokens=False)["input_ids"]
    (group,) = sampler.generate_ids([prompt], SamplingParams(n=2, max_new_tokens=200), seed=5)
    for c in group:
        expected = "17*23: <code>print(17*23)</code>\n<interpreter>\n391\n</interpreter>\nso #### 391"
        assert c.text == expected and c.finish_reason == "stop" and c.tool_calls == ["ok"]
        (span,) = c.tool_spans
        assert tokenizer.decode(c.token_ids[span[0] : span[1]]) == "\n<interpreter>\n391\n</interpreter>\n"
        assert span[0] == len("17*23: <code>print(17*23)</code>")
        assert c.logprobs[span[0] : span[1]] == [0.0] * (span[1] - span[0])
        assert c.logprobs[: span[0]] == [-0.5] * span[0] and len(c.logprobs) == len(c.token_ids)
    # One call for the first turn (n = 2), one for the second with both responses together.
    assert [(call["requests"], call["n"]) for call in policy.calls] == [(1, 2), (2, 1)]
    assert policy.calls[1]["seed"] != 5


def test_tool_calls_stop_at_the_limit(tokenizer, sandbox):
    script = ["<code>print(1)</code>", "<code>print(2)</code>", "<code>print(3)</code>", "never"]
    sampler, policy = loop(tokenizer, sandbox, script, max_tool_calls=2)
    (group,) = sampler.generate_ids([[65]], SamplingParams(n=1, max_new_tokens=500), seed=0)
    (c,) = group
    assert c.tool_calls == ["ok", "ok"] and len(c.tool_spans) == 2
    assert c.text.endswith("<code>print(3)</code>"), "the third block is written but not run"
    assert c.finish_reason == "stop" and len(policy.calls) == 3


def test_tool_output_counts_against_the_budget(tokenizer, sandbox):
    sampler, _ = loop(tokenizer, sandbox, ["<code>print('x' * 80)</code>", "after"])
    (group,) = sampler.generate_ids([[65]], SamplingParams(n=1, max_new_tokens=40), seed=0)
    (c,) = group
    assert len(c.token_ids) == 40 and c.finish_reason == "length", "the output was cut: unfinished"
    assert c.tool_spans == [(len("<code>print('x' * 80)</code>"), 40)]


def test_errors_reach_the_model_and_the_run_goes_on(tokenizer, sandbox):
    sampler, _ = loop(tokenizer, sandbox, ["<code>1/0</code>", "oops #### 0"])
    (group,) = sampler.generate_ids([[65]], SamplingParams(n=1, max_new_tokens=400), seed=0)
    (c,) = group
    assert c.tool_calls == ["error"] and "ZeroDivisionError" in c.text and c.text.endswith("oops #### 0")


def test_responses_without_calls_are_untouched(tokenizer, sandbox):
    sampler, policy = loop(tokenizer, sandbox, ["just #### 4"])
    (group,) = sampler.generate_ids([[65]], SamplingParams(n=3, max_new_tokens=50), seed=0)
    assert all(c.text == "just #### 4" and c.tool_spans == [] for c in group)
    assert len(policy.calls) == 1


def test_a_rollout_from_inside_a_code_block_runs_it(tokenizer, sandbox):
    # A Monte Carlo state can end inside a code block: its rollout closes the block and the call runs.
    sampler, _ = loop(tokenizer, sandbox, ["*3)</code>", "then #### 21"])
    prefix = tokenizer("Q? <code>print(7", add_special_tokens=False)["input_ids"]
    (group,) = sampler.generate_ids([prefix], SamplingParams(n=1, max_new_tokens=100), seed=0)
    (c,) = group
    assert c.tool_calls == ["ok"] and c.text == "*3)</code>\n<interpreter>\n21\n</interpreter>\nthen #### 21"
