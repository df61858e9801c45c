"""Sampling: the `Sampler` protocol every backend implements (`spo_cli.sample.base`), and the one place a backend is
chosen."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spo_cli.sample.base import (
    VLLM_INSTALL_HINT, Completion, Sampler, SamplingParams, encode_prompts, finish_response, new_token_budgets,
)  # fmt: skip
from spo_cli.sample.sharded import ShardedSampler

if TYPE_CHECKING:
    from spo_cli.hardware import Runtime
    from spo_cli.recipe import Sampling

__all__ = [
    "VLLM_INSTALL_HINT",
    "Completion",
    "Sampler",
    "SamplingParams",
    "build_sampler",
    "check_backend_installed",
    "encode_prompts",
    "finish_response",
    "new_token_budgets",
    "sampling_params",
]


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


def check_backend_installed(spec: Sampling) -> None:
    """Fail when a run starts, not after its warm start, if the recipe's sampling engine is not installed."""
    import importlib.util

    if spec.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from spo_cli.errors import SpoUserError

        raise SpoUserError(
            f"`sampling.backend: vllm` needs vLLM, but it is not installed. Install it {VLLM_INSTALL_HINT}; "
            "or use `sampling.backend: hf`."
        )


def build_sampler(
    spec: Sampling, model, tokenizer, runtime: Runtime, *, cluster=None, seed: int = 0, log=None
) -> Sampler:
    """The recipe's sampling backend over `model` (the policy module it samples and, for vLLM, scores with).

    With `spec.tools` the backend runs inside the tool loop (`log`, if given, is told how the sandbox is isolated).
    With several processes (`cluster`) every call is split between them and the results gathered: each process
    samples its share of the requests, tool calls included, and every process returns all of them.
    """
    match spec.backend:
        case "hf":
            from spo_cli.sample.hf import HFSampler

            sampler = HFSampler(model, tokenizer, runtime, generation_batch_size=spec.generation_batch_size)
        case "vllm":
            from spo_cli.sample.vllm import VLLMSampler

            sampler = VLLMSampler(model, tokenizer, runtime, spec.vllm, seed=seed, cluster=cluster)
        case _:
            raise AssertionError(f"unhandled sampling backend {spec.backend!r}")
    if spec.tools is not None:
        from spo_cli.sample.tools import ToolLoopSampler, build_sandbox
        from spo_cli.tools.calls import tool_markers

        tools = spec.tools
        sandbox = build_sandbox(tools)
        if not getattr(sandbox, "isolated", True):  # the recipe allowed it: say so where nobody can miss it
            print(f"spo: WARNING: model-written code runs unsandboxed: {sandbox.isolation}", file=sys.stderr)
        if log is not None:
            log(f"tools: up to {tools.max_tool_calls} Python calls per response; sandbox: {sandbox.isolation}")
        sampler = ToolLoopSampler(sampler, tokenizer, sandbox, tool_markers(tools), tools.max_tool_calls)
    if cluster is not None and cluster.world_size > 1:
        return ShardedSampler(sampler, cluster)
    return sampler
