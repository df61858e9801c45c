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

    def encode_prompts(self, prompts):
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

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


def test_calls_a_prefix_made_count_against_the_limit(tokenizer, sandbox):
    # A Monte Carlo state after one call: with max_tool_calls 2 its rollout may make one more, as the response could.
    script = ["<code>print(1)</code>", "<code>print(2)</code>", "<code>print(3)</code>", "never"]
    sampler, policy = loop(tokenizer, sandbox, script, max_tool_calls=2)
    prefix = tokenizer("Q<code>print(1)</code>\n<interpreter>\n1\n</interpreter>\n", add_special_tokens=False)
    prompts = [prefix["input_ids"], [65]]
    params = SamplingParams(n=1, max_new_tokens=500)
    after_one, fresh = sampler.generate_ids(prompts, params, seed=0, calls_made=[1, 0])
    assert after_one[0].tool_calls == ["ok"] and after_one[0].text.endswith("<code>print(3)</code>")
    assert fresh[0].tool_calls == ["ok", "ok"]
    (spent,) = sampler.generate_ids([prefix["input_ids"]], params, seed=0, calls_made=[2])
    assert spent[0].tool_calls == [] and spent[0].text == "<code>print(2)</code>", "no call left: not run"


class ContinuingPolicy:
    """Writes the rest of `target` after what the request's response holds so far (the tool outputs in `target`
    written as the loop writes them), cut by `finish_response` like a backend: an SPO-tree level continues a
    segment cut by its budget, and the text reads as one response."""

    def __init__(self, tokenizer, prompt: str, target: str):
        self.tokenizer, self.prompt, self.target = tokenizer, prompt, target
        self.calls: list[dict] = []

    def shard_unit(self, params):
        return 1

    def generate_ids(self, prompt_ids, params, seed, offset=0, caps=None):
        self.calls.append({"caps": caps, "max_new_tokens": params.max_new_tokens})
        groups = []
        for i, ids in enumerate(prompt_ids):
            written = self.tokenizer.decode(ids)[len(self.prompt) :]
            assert self.target.startswith(written), (written, self.target)
            rest = self.tokenizer(self.target[len(written) :], add_special_tokens=False)["input_ids"]
            budget = params.max_new_tokens if caps is None else min(params.max_new_tokens, caps[i])
            tokens, text, reason = finish_response(self.tokenizer, (rest + [self.tokenizer.eos_token_id])[:budget], params)
            groups.append([Completion(list(ids), tokens, text, reason, [-0.5] * len(tokens), [0.1] * len(tokens))] * params.n)
        return groups


def grow(tokenizer, sandbox, target: str, segment_tokens: int, max_tool_calls: int):
    from spo_cli.estimate.tree.growth import TreeRoot, expand_trees
    from spo_cli.recipe import Arith
    from spo_cli.tasks import build_task

    policy = ContinuingPolicy(tokenizer, "Q:", target)
    sampler = ToolLoopSampler(policy, tokenizer, sandbox, ToolMarkers(), max_tool_calls)
    root = TreeRoot("t", "q", "Q:", tuple(tokenizer("Q:", add_special_tokens=False)["input_ids"]), "42")
    episodes, _ = expand_trees(
        [root], sampler, tokenizer, build_task(Arith(), 1), branching=[2, 2], segment_tokens=segment_tokens,
        params=SamplingParams(max_new_tokens=200), seed=0, iteration=0,
    )  # fmt: skip
    return {ep.metadata["tree"]["node"]: ep for ep in episodes}


OUTPUT_42 = "\n<interpreter>\n42\n</interpreter>\n"


def test_a_tree_segment_budget_counts_policy_tokens_and_keeps_outputs_whole(tokenizer, sandbox):
    call = "<code>print(6*7)</code>"
    nodes = grow(tokenizer, sandbox, call + OUTPUT_42 + "so #### 42", segment_tokens=len(call) + 7, max_tool_calls=2)
    first = nodes["0"]
    # 23 policy tokens, the whole 33-token output (over the 30-token budget), then 7 more policy tokens.
    assert first.response == call + OUTPUT_42 + "so ####" and first.finish_reason == "length"
    assert first.tool_spans == [(len(call), len(call) + len(OUTPUT_42))] and first.metadata["tool_calls"] == ["ok"]
    leaf = nodes["0.0"]
    assert leaf.response == " 42" and leaf.tool_spans == [] and leaf.reward == 1.0


def test_calls_above_a_tree_node_count_against_its_expansions(tokenizer, sandbox):
    # One call allowed: the first runs in level 0; the block level 1 closes is written but not run.
    call = "<code>print(6*7)</code>"
    target = call + OUTPUT_42 + "<code>print(1)</code>"
    nodes = grow(tokenizer, sandbox, target, segment_tokens=len(call), max_tool_calls=1)
    assert nodes["0"].response == call + OUTPUT_42 and nodes["0"].finish_reason == "length"
    assert nodes["0"].metadata["tool_calls"] == ["ok"]
    leaf = nodes["0.1"]
    assert leaf.response == "<code>print(1)</code>" and leaf.tool_spans == [] and leaf.finish_reason == "stop"
    assert "tool_calls" not in leaf.metadata


def test_tool_call_metrics_by_hand():
    from spo_cli.tools.calls import tool_call_metrics

    # 3 responses, 4 calls, one a timeout: 4/3 calls per response, 1/4 failed.
    assert tool_call_metrics([["ok", "timeout"], [], ["ok", "ok"]]) == {
        "tool_call_frequency": 4 / 3, "tool_failure_frequency": 0.25,
    }  # fmt: skip
    assert tool_call_metrics([[], []]) == {"tool_call_frequency": 0.0, "tool_failure_frequency": 0.0}


def test_held_out_eval_reports_how_often_tools_are_called(tokenizer, sandbox):
    from spo_cli.evaluate import evaluate_policy
    from spo_cli.recipe import Arith, Eval
    from spo_cli.tasks import Problem, build_task

    sampler, _ = loop(tokenizer, sandbox, ["<code>print(6*7)</code>", "so #### 42"])
    problems = [Problem("a", "6 times 7?", "42"), Problem("b", "6 times 7?", "41")]
    out = evaluate_policy(sampler, tokenizer, build_task(Arith(), 1), problems, Eval(num_samples=0), 100, 0, tools=True)
    assert out["eval/greedy_accuracy"] == 0.5 and out["eval/greedy_tool_call_frequency"] == 1.0
    assert out["eval/greedy_tool_failure_frequency"] == 0.0
