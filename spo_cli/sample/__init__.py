"""Sampling: the `Sampler` protocol every backend implements, and the one place a backend is chosen."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from spo_cli.hardware import Runtime
    from spo_cli.recipe import Sampling


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


class Sampler(Protocol):
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]: ...

    def generate(self, prompts: Sequence[str], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """params.n completions per prompt; the randomness is a function of `seed` alone."""
        ...

    def generate_ids(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        """The same from token ids (Monte Carlo rollouts continue exact token prefixes, not re-tokenized text)."""
        ...


def sampling_params(spec: Sampling, stop: Sequence[str] = (), max_context: int | None = None) -> SamplingParams:
    """Training sampling settings; `max_context` (the model's) applies unless the recipe sets its own."""
    return SamplingParams(
        n=spec.num_generations,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        max_new_tokens=spec.max_completion_length,
        stop=tuple(dict.fromkeys([*spec.stop, *stop])),
        keep_eos_token=spec.keep_eos_token,
        max_total_tokens=spec.max_context_length or max_context,
    )


def new_token_budgets(prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[int]:
    """New tokens each prompt may get: max_new_tokens, capped so prompt + response fit max_total_tokens."""
    if params.max_total_tokens is None:
        return [params.max_new_tokens] * len(prompt_ids)
    budgets = [min(params.max_new_tokens, params.max_total_tokens - len(p)) for p in prompt_ids]
    worst = min(range(len(budgets)), key=budgets.__getitem__, default=None)
    if worst is not None and budgets[worst] < 1:
        raise ValueError(
            f"a prompt of {len(prompt_ids[worst])} tokens leaves no room for a response in a context of "
            f"{params.max_total_tokens} tokens (filter long prompts with sampling.max_prompt_length)"
        )
    return budgets


def build_sampler(spec: Sampling, model, tokenizer, runtime: Runtime) -> Sampler:
    match spec.backend:
        case "hf":
            from spo_cli.sample.hf import HFSampler

            return HFSampler(model, tokenizer, runtime, generation_batch_size=spec.generation_batch_size)
    raise AssertionError(f"unhandled sampling backend {spec.backend!r}")
