"""The tool loop over the vLLM-CPU sampler with the real model (the HF version: tests/real_model)."""

from __future__ import annotations

import pytest

from ..conftest import REAL_MODEL, REAL_MODEL_MISSING
from ..real_model.test_tool_loop_real import check_real_calls, tool_completions
from ._common import CPU, needs_vllm


@needs_vllm
@pytest.mark.real_model
@pytest.mark.skipif(not (REAL_MODEL / "config.json").is_file(), reason=REAL_MODEL_MISSING)
def test_vllm_sampling_with_a_python_tool():
    from spo_cli.models import load_checkpoint
    from spo_cli.recipe import Vllm
    from spo_cli.sample.vllm import VLLMSampler

    model, tokenizer = load_checkpoint(REAL_MODEL)
    sampler = VLLMSampler(model.float().eval(), tokenizer, CPU, Vllm(logprobs_source="engine"), seed=0)
    try:
        group = tool_completions(sampler, tokenizer)
    finally:
        sampler.close()
    check_real_calls(group, tokenizer)
