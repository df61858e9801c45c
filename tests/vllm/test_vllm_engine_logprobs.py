"""`logprobs_source: engine` (vLLM's own log-probs) for a policy loaded from a checkpoint directory, and what building
an engine leaves of the trainer's process."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from spo_cli.sample import SamplingParams

from ._common import CPU, manual_logprobs, needs_vllm, tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from spo_cli.models import save_model
    from spo_cli.recipe import Vllm
    from spo_cli.sample.vllm import VLLMSampler, import_vllm

    model, tokenizer = tiny_model()
    path = tmp_path_factory.mktemp("policy")
    save_model(model, tokenizer, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    import_vllm()  # what importing vLLM sets up (TORCHINDUCTOR_COMPILE_THREADS, ...) is its own and stays
    before = process_state()
    sampler = VLLMSampler(model, tokenizer, CPU, Vllm(logprobs_source="engine"), seed=0)
    after = process_state()
    yield sampler, model, (before, after)
    sampler.close()


def process_state() -> dict:
    return {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "threads": torch.get_num_threads(),
        "environment": {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")},
    }


@needs_vllm
def test_building_an_engine_leaves_the_trainers_process_as_it_was(engine):
    _, _, (before, after) = engine
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["python_rng"] == after["python_rng"] and (before["numpy_rng"] == after["numpy_rng"]).all()
    assert before["threads"] == after["threads"]
    assert before["environment"] == after["environment"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.get_num_threads() != threads, "torch.set_num_threads works again"
    finally:
        torch.set_num_threads(threads)


@needs_vllm
def test_engine_logprobs_are_log_softmax_at_the_temperature(engine):
    sampler, model, _ = engine
    prompts = ["Start at 3. Add 4. Result?", "Start at 10. Times 2. Minus 1. Result?"]
    groups = sampler.generate(prompts, SamplingParams(n=3, temperature=0.7, max_new_tokens=16), seed=2)
    for c in (c for g in groups for c in g):
        assert len(c.logprobs) == len(c.token_ids) > 0 and c.entropies == []
        assert torch.allclose(torch.tensor(c.logprobs), manual_logprobs(model, c, 0.7), atol=1e-4)


@needs_vllm
def test_engine_logprobs_refuse_nucleus_sampling(engine):
    sampler, _, _ = engine
    with pytest.raises(ValueError, match="top_p 1 and top_k 0"):
        sampler.generate(["x"], SamplingParams(n=2, temperature=0.7, top_p=0.9), seed=0)
    (group,) = sampler.generate(["x"], SamplingParams(n=2, temperature=0.7, top_p=0.9, logprobs=False), seed=0)
    assert all(c.logprobs == [] for c in group)
