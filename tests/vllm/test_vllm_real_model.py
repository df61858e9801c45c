"""The vLLM sampler on a real pretrained model (SmolLM2-135M-Instruct: Llama, BPE, chat template) and on a LoRA
policy (the engine gets the merged weights): vLLM's log-probabilities of what it sampled equal the trained module's."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spo_cli.sample import SamplingParams

from ..conftest import DATA, REAL_MODEL, REAL_MODEL_MISSING
from ._common import CPU, manual_logprobs, needs_vllm, tiny_model


@needs_vllm
@pytest.mark.real_model
@pytest.mark.skipif(not (REAL_MODEL / "config.json").is_file(), reason=REAL_MODEL_MISSING)
def test_vllm_samples_the_real_model_with_its_chat_template_and_stop_string():
    from spo_cli.models import load_checkpoint
    from spo_cli.recipe import Vllm
    from spo_cli.sample.vllm import VLLMSampler
    from spo_cli.tasks import apply_template

    model, tokenizer = load_checkpoint(REAL_MODEL)
    model = model.float().eval()
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]]
    prompts = [apply_template(tokenizer, row["question"], True) for row in rows]
    sampler = VLLMSampler(model, tokenizer, CPU, Vllm(logprobs_source="engine"), seed=0)
    try:
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=48, stop=["\n\n"])
        groups = sampler.generate(prompts, params, seed=3)
    finally:
        sampler.close()
    completions = [c for g in groups for c in g]
    assert len(completions) == 4
    for c in completions:
        assert c.prompt_token_ids[:3] == tokenizer(prompts[0]).input_ids[:3]  # <|im_start|>user ...
        assert "\n\n" not in c.text and len(c.token_ids) > 0
        # Real BPE: most tokens are several characters.
        assert len(c.token_ids) < len(c.text) or c.finish_reason == "stop"
        assert torch.allclose(torch.tensor(c.logprobs), manual_logprobs(model, c, 1.0), atol=2e-3)


@needs_vllm
def test_vllm_samples_a_lora_policy_with_its_merged_weights():
    from spo_cli.lora import apply_lora
    from spo_cli.recipe import Lora, Vllm
    from spo_cli.sample.vllm import VLLMSampler

    model, tokenizer = tiny_model()
    policy = apply_lora(copy.deepcopy(model), Lora(r=4, lora_alpha=8.0), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    policy.eval()
    sampler = VLLMSampler(policy, tokenizer, CPU, Vllm(logprobs_source="engine"), seed=0)
    try:
        groups = sampler.generate(["Start at 3. Add 4. Result?"], SamplingParams(n=3, temperature=0.7, max_new_tokens=16), seed=1)
    finally:
        sampler.close()
    for c in groups[0]:
        expected = manual_logprobs(policy, c, 0.7)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
        assert not torch.allclose(expected, manual_logprobs(model, c, 0.7), atol=1e-3), "the adapters matter here"
