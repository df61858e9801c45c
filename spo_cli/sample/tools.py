"""The tool loop (docs/tools.md#the-tool-loop): a sampler around any other that lets the model run Python.

Generation stops where a code block closes (`markers.code_end`, kept in the response), the sandbox runs every
closed block of the turn at once, each output is appended between the output markers as tool tokens, and one
generate call continues every response that is still running. A response gets at most `max_tool_calls` calls and
`params.max_new_tokens` tokens in all, tool tokens included: a tool output that does not fit is cut and the
response ends as `length` (unfinished). With `params.tool_tokens_in_budget` off (SPO-tree's segments) the budget
counts the policy's tokens only and an output is cut only by the context. After its last allowed call a response
runs on without tools: a code block it closes then is not run, and the response ends there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from spo_cli.sample.base import Completion, Sampler, SamplingParams
from spo_cli.seeding import derive_seed
from spo_cli.tools.calls import ToolMarkers, code_to_run, output_block


@dataclass
class _Response:
    """One response while its turns are sampled."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    tool_spans: list[tuple[int, int]] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    turn_text: str = ""  # the text of the policy's latest turn
    calls_allowed: int = 0  # max_tool_calls less the calls its prompt made (a Monte Carlo state's prefix)
    tool_tokens: int = 0

    def policy_tokens(self) -> int:
        return len(self.tokens) - self.tool_tokens

    def extend(self, completion: Completion) -> None:
        self.tokens += completion.token_ids
        self.logprobs += completion.logprobs
        self.entropies += completion.entropies
        self.finish_reason = completion.finish_reason
        self.turn_text = completion.text


@dataclass(frozen=True)
class _Budget:
    """A response's token limits: `new_tokens` on what counts (all tokens, or the policy's only when not
    `counts_tools`), `total` on all its tokens (None: no limit but the budget's)."""

    new_tokens: int
    total: int | None
    counts_tools: bool

    def room(self, response: _Response) -> int:
        """Tokens the policy may still write."""
        used = len(response.tokens) if self.counts_tools else response.policy_tokens()
        left = self.new_tokens - used
        return left if self.total is None else min(left, self.total - len(response.tokens))


def build_sandbox(tools):
    """The sandbox of the recipe's `sampling.tools` section (the one place its `sandbox.kind` maps to code)."""
    from spo_cli.recipe import LocalSandbox as LocalSpec
    from spo_cli.recipe import SandboxFusion as RemoteSpec
    from spo_cli.tools.remote import RemoteSandbox
    from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

    limits = SandboxLimits(
        wall_seconds=tools.wall_seconds, cpu_seconds=tools.cpu_seconds, memory_mb=tools.memory_mb,
        output_bytes=tools.output_bytes, disk_mb=tools.disk_mb, open_files=tools.open_files,
        processes=tools.processes,
    )  # fmt: skip
    match tools.sandbox:
        case LocalSpec():
            spec = tools.sandbox
            return LocalSandbox(
                limits, python=spec.python, workers=spec.workers, allow_unisolated=spec.allow_unisolated
            )
        case RemoteSpec():
            spec = tools.sandbox
            return RemoteSandbox(spec.url, limits, workers=spec.workers, retries=spec.retries)
    raise AssertionError(f"unhandled sandbox kind {tools.sandbox.kind!r}")


class ToolLoopSampler:
    """A `Sampler` whose responses may call a sandbox (module docstring). `sandbox` has `run_many(codes)`."""

    def __init__(self, inner: Sampler, tokenizer, sandbox, markers: ToolMarkers, max_tool_calls: int):
        self.inner = inner
        self.tokenizer = tokenizer
        self.sandbox = sandbox
        self.markers = markers
        self.max_tool_calls = max_tool_calls

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.inner.encode_prompts(prompts)

    def shard_unit(self, params: SamplingParams) -> int:
        return self.inner.shard_unit(params)

    def sync_weights(self) -> None:
        self.inner.sync_weights()

    def sleep(self) -> None:
        self.inner.sleep()

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seed: int, offset: int = 0
    ) -> list[list[Completion]]:
        return self.generate_ids(self.encode_prompts(prompts), params, seed, offset)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        offset: int = 0,
        caps: Sequence[int] | None = None,
        calls_made: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """The first turn is one call of the inner sampler (its randomness as without tools); turn t continues the
        responses still running, in their order, with seed derive_seed(seed, "tool-turn", t) and request index
        `offset * n` + the response's index among those continued. `calls_made[i]`: the calls prompt i already
        made (a Monte Carlo state that continues a response), which count against `max_tool_calls`."""
        with_tools = replace(params, keep_stop=(*params.keep_stop, self.markers.code_end))
        first = self.inner.generate_ids(prompt_ids, with_tools, seed, offset, caps)
        made = calls_made or [0] * len(prompt_ids)
        groups = [
            [self._start(list(p), c, max(0, self.max_tool_calls - m)) for c in group]
            for p, m, group in zip(prompt_ids, made, first)
        ]
        flat = [r for group in groups for r in group]
        budgets = [self._budget(params, caps, r, i // params.n) for i, r in enumerate(flat)]
        for turn in range(1, self.max_tool_calls + 1):
            calling = [i for i, r in enumerate(flat) if self._calls_tool(r)]
            if not calling:
                break
            results = self.sandbox.run_many([self._code(flat[i]) for i in calling])
            running = [i for i, result in zip(calling, results) if self._append_output(flat[i], result, budgets[i])]
            if not running:
                break
            # Still stopping at a closed block after the last allowed call: the response ends there, not run.
            prefixes = [flat[i].prompt + flat[i].tokens for i in running]
            room = [budgets[i].room(flat[i]) for i in running]
            turn_seed = derive_seed(seed, "tool-turn", turn)
            more = self.inner.generate_ids(prefixes, replace(with_tools, n=1), turn_seed, offset * params.n, room)
            for i, group in zip(running, more):
                flat[i].extend(group[0])
        return [[self._finish(r) for r in group] for group in groups]

    # ------------------------------------------------------------------------------------------------ helpers

    def _start(self, prompt: list[int], completion: Completion, calls_allowed: int) -> _Response:
        response = _Response(prompt, calls_allowed=calls_allowed)
        response.extend(completion)
        return response

    def _calls_tool(self, response: _Response) -> bool:
        """The latest turn stopped at a closed code block, and calls are left. The block's end marker may have
        begun before the turn (a Monte Carlo state that ends inside it); it ends in the turn."""
        if response.finish_reason != "stop" or len(response.tool_calls) >= response.calls_allowed:
            return False
        text = self.tokenizer.decode(response.prompt + response.tokens, skip_special_tokens=True)
        closed = text.rfind(self.markers.code_end)
        turn_start = len(text) - len(response.turn_text)
        return closed >= 0 and closed + len(self.markers.code_end) > turn_start and self._code(response) is not None

    def _code(self, response: _Response) -> str | None:
        """The block the latest turn closed. It may have opened before this call's response: a Monte Carlo rollout
        continues a prefix that ends inside a code block, which is part of its prompt here."""
        text = self.tokenizer.decode(response.prompt + response.tokens, skip_special_tokens=True)
        return code_to_run(text, self.markers)

    @staticmethod
    def _budget(params: SamplingParams, caps, response: _Response, request: int) -> _Budget:
        new_tokens = params.max_new_tokens if caps is None else min(params.max_new_tokens, caps[request])
        if params.tool_tokens_in_budget:
            return _Budget(new_tokens, new_tokens, counts_tools=True)
        context = None if params.max_total_tokens is None else params.max_total_tokens - len(response.prompt)
        return _Budget(new_tokens, context, counts_tools=False)

    def _append_output(self, response: _Response, result, budget: _Budget) -> bool:
        """Append the tool's output as tool tokens; False when the response has no room left (it ends there)."""
        text = self.tokenizer.decode(response.tokens, skip_special_tokens=True)
        ids = self.tokenizer(output_block(text, result.output, self.markers), add_special_tokens=False)["input_ids"]
        if budget.total is not None:
            ids = ids[: max(0, budget.total - len(response.tokens))]
        start = len(response.tokens)
        response.tokens += ids
        response.tool_tokens += len(ids)
        response.logprobs += [0.0] * len(ids)
        response.entropies += [0.0] * len(ids)
        if ids:
            response.tool_spans.append((start, start + len(ids)))
        response.tool_calls.append(result.status)
        response.turn_text = ""
        if budget.room(response) <= 0:
            response.finish_reason = "length"
            return False
        return True

    def _finish(self, response: _Response) -> Completion:
        return Completion(
            prompt_token_ids=response.prompt,
            token_ids=response.tokens,
            text=self.tokenizer.decode(response.tokens, skip_special_tokens=True),
            finish_reason=response.finish_reason,
            logprobs=response.logprobs,
            entropies=response.entropies,
            tool_spans=response.tool_spans,
            tool_calls=response.tool_calls,
        )
