"""The HF sampler on a tiny local model: log-probs, seeding, EOS and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from spo_cli.hardware import Runtime
from spo_cli.policy import collate, forward_logprobs
from spo_cli.sample import SamplingParams, finish_response
from spo_cli.sample.hf import HFSampler

CPU = Runtime(device="cpu", bf16=False)


@pytest.fixture
def sampler(tiny_policy):
    model, tokenizer = tiny_policy
    return HFSampler(model, tokenizer, CPU, generation_batch_size=8)


def test_shapes_and_logprobs_match_a_forward_pass(sampler, tiny_policy):
    model, tokenizer = tiny_policy
    prompts = ["Start at 3. Add 4. Result?", "Start at 10. Times 2. Minus 1. Result?", "x"]
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=12)
    groups = sampler.generate(prompts, params, seed=1)
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(prompts, groups):
        for c in group:
            assert c.prompt_token_ids == tokenizer(prompt)["input_ids"]
            assert len(c.logprobs) == len(c.token_ids) <= 12
            assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == 12
    # Recompute one completion's log-probs by hand: log_softmax(logits / T) at each sampled token.
    c = groups[1][0]
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(c.prompt_token_ids) - 1 : -1] / 0.7
    manual = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), manual, atol=1e-4)


def test_same_seed_same_samples_and_global_rng_untouched(sampler):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sampler.generate(["Start at 5. Add 1. Result?"], params, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = sampler.generate(["Start at 5. Add 1. Result?"], params, seed=7)
    c = sampler.generate(["Start at 5. Add 1. Result?"], params, seed=8)
    assert [x.token_ids for x in a[0]] == [x.token_ids for x in b[0]]
    assert [x.token_ids for x in a[0]] != [x.token_ids for x in c[0]]


def test_chunking_does_not_change_results(tiny_policy):
    model, tokenizer = tiny_policy
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    prompts = [f"Start at {i}. Add 2. Result?" for i in range(5)]
    big = HFSampler(model, tokenizer, CPU, generation_batch_size=64).generate(prompts, params, seed=0)
    small = HFSampler(model, tokenizer, CPU, generation_batch_size=2).generate(prompts, params, seed=0)
    assert [[c.text for c in g] for g in big] == [[c.text for c in g] for g in small]


def test_eos_and_stop_string_handling(tiny_policy):
    _, tok = tiny_policy
    eos = tok.eos_token_id
    body = tok("12+3=15\n#### 15", add_special_tokens=False)["input_ids"]
    keep = SamplingParams(keep_eos_token=True)
    drop = SamplingParams(keep_eos_token=False)
    assert finish_response(tok, body + [eos, tok.pad_token_id], keep) == (body + [eos], "12+3=15\n#### 15", "stop")
    assert finish_response(tok, body + [eos], drop) == (body, "12+3=15\n#### 15", "stop")
    assert finish_response(tok, body, keep) == (body, "12+3=15\n#### 15", "length")
    stop = SamplingParams(stop=("\n####",))
    ids, text, reason = finish_response(tok, body + [eos], stop)
    assert (text, reason) == ("12+3=15", "stop") and tok.decode(ids) == "12+3=15"


def test_a_kept_stop_string_ends_the_response_with_it(tiny_policy):
    _, tok = tiny_policy
    body = tok("<code>print(1)</code>\nmore", add_special_tokens=False)["input_ids"]
    tool = SamplingParams(stop=("####",), keep_stop=("</code>",))
    ids, text, reason = finish_response(tok, body + [tok.eos_token_id], tool)
    assert (text, reason) == ("<code>print(1)</code>", "stop") and ids == body[: len("<code>print(1)</code>")]
    # The earliest stop string wins, kept or not.
    first = tok("#### 2 <code>x</code>", add_special_tokens=False)["input_ids"]
    assert finish_response(tok, first, tool)[1:] == ("", "stop")


def test_a_stop_string_that_began_in_the_prompt_ends_the_response(tiny_policy):
    # A Monte Carlo state that ends inside a stop string: the token that completes it stops the response (where
    # Hugging Face's generate stops), kept or not; one wholly inside the prompt does not count.
    _, tok = tiny_policy
    prompt = tok("x = 1\nprint(x)\n", add_special_tokens=False)["input_ids"]
    rest = tok("```\nmore", add_special_tokens=False)["input_ids"]
    fence = SamplingParams(keep_stop=("\n```\n",))
    ids, text, reason = finish_response(tok, rest, fence, prompt)
    assert (text, reason) == ("```\n", "stop") and ids == rest[: len("```\n")]
    assert finish_response(tok, rest, fence)[1:] == ("```\nmore", "length"), "without the prompt: no stop"
    dropped = SamplingParams(stop=("\n```",))
    assert finish_response(tok, rest, dropped, prompt)[:2] == ([], "")
    inside = SamplingParams(stop=("print",))
    assert finish_response(tok, rest, inside, prompt)[1:] == ("```\nmore", "length")


def test_policy_collate_alignment():
    batch = collate([[1, 2], [3]], [[7, 8, 9], [6]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 7, 8, 9], [3, 6, 0, 0, 0]]
    # position j scores token j+1: response tokens of row 0 are at 1..3, of row 1 at 0
    assert batch.response_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    placed = batch.scatter([[0.1, 0.2, 0.3], [0.5]])
    assert torch.allclose(placed, torch.tensor([[0, 0.1, 0.2, 0.3], [0.5, 0, 0, 0]]))
    assert batch.gather(placed) == [pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.5])]


def test_right_padding_does_not_change_logprobs(tiny_policy):
    model, _ = tiny_policy
    alone = collate([[5, 6, 7]], [[8, 9]], pad_id=0)
    padded = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10, 11]], [[8, 9], [12, 13, 14]], pad_id=0)
    with torch.no_grad():
        a, _ = forward_logprobs(model, alone, 1.0)
        b, _ = forward_logprobs(model, padded, 1.0)
    assert torch.allclose(torch.tensor(alone.gather(a)[0]), torch.tensor(padded.gather(b)[0]), atol=1e-5)


def test_entropies_match_a_forward_pass(sampler, tiny_policy):
    from spo_cli.optimize.loss import token_entropy

    model, _ = tiny_policy
    c = sampler.generate(["Start at 4. Minus 1. Result?"], SamplingParams(n=2, temperature=0.8, max_new_tokens=10), 3)[0][1]
    assert len(c.entropies) == len(c.token_ids)
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[:, len(c.prompt_token_ids) - 1 : -1]
    assert torch.allclose(torch.tensor(c.entropies), token_entropy(logits, 0.8)[0], atol=1e-4)
    # a 512-token vocabulary bounds the entropy by log(512)
    assert all(0 <= h <= math.log(512) + 1e-4 for h in c.entropies)


def test_shared_prefill_and_dropped_rows_sample_what_every_row_prefilled_samples(tiny_policy):
    """The prompt is prefilled once for its n samples and a row leaves the batch when it ends; the samples are
    those of a sampler that prefills every sample, and the forward pass reads each prompt once plus one position per
    generated token."""
    model, tokenizer = tiny_policy
    prompts = ["Start at 7. Add 5. Minus 3. Times 2. Result?", "Start at 1. Result?"]
    n, new = 4, 24
    # Single characters as kept stop strings end rows early (the random model seldom samples EOS); a response is
    # then exactly the tokens its row generated.
    params = SamplingParams(n=n, max_new_tokens=new, stop=(), keep_stop=tuple("0123456789abcdefgh"), keep_eos_token=True)
    counted = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: counted.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        shared = HFSampler(model, tokenizer, CPU).generate(prompts, params, seed=5)
        ours = sum(counted)
        counted.clear()
        naive = HFSampler(model, tokenizer, CPU, shared_prefill=False).generate(prompts, params, seed=5)
        every_prefilled = sum(counted)
    finally:
        hook.remove()
    assert [[c.token_ids for c in g] for g in shared] == [[c.token_ids for c in g] for g in naive]
    lengths = [len(c.token_ids) for g in shared for c in g]
    assert min(lengths) < new, "some row must end early for the check to mean anything"
    width = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert ours == len(prompts) * (width - 1) + sum(lengths)
    assert every_prefilled == len(prompts) * n * width + sum(lengths) - len(prompts) * n


def test_first_tokens_follow_the_warped_distribution(tiny_policy):
    """Sampling draws from softmax(logits / T) restricted to the top-k (what generate's warpers leave)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    model, tokenizer = tiny_policy
    prompt = "Start at 2. Add 2. Result?"
    draws = 3000
    params = SamplingParams(n=draws, temperature=0.7, top_k=12, max_new_tokens=1, stop=(), keep_eos_token=True)
    group = HFSampler(model, tokenizer, CPU, generation_batch_size=draws).generate([prompt], params, seed=11)[0]
    first = torch.tensor([c.token_ids[0] for c in group])
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[:, -1].float()
    probs = torch.softmax(TopKLogitsWarper(12)(None, logits / 0.7), dim=-1)[0]
    counts = torch.bincount(first, minlength=probs.shape[0]).float() / draws
    assert set(first.tolist()) <= set(torch.topk(logits[0], 12).indices.tolist())
    assert float((counts - probs).abs().max()) < 0.03


def test_logprobs_are_full_softmax_not_top_p_truncated(sampler, tiny_policy):
    """SPO's cutpoints and pi_old use the temperature-scaled full softmax, whatever top_p truncates."""
    model, _ = tiny_policy
    c = sampler.generate(["Start at 9. Add 9. Result?"], SamplingParams(n=2, temperature=0.6, top_p=0.3, max_new_tokens=8), 2)[0][0]
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(c.prompt_token_ids) - 1 : -1] / 0.6
    full = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), full, atol=1e-4)
    # renormalised over the top-p nucleus the sampled tokens would be more probable than that
    assert any(lp < -1e-3 for lp in c.logprobs)


def test_context_caps_each_prompt_on_its_own(sampler, tiny_policy):
    # Prompts of 1 and 30 tokens, 12 new tokens, a context of 36: the long prompt gets 6 tokens, the short
    # one its full 12, and the short one samples what it samples without the cap (the row is only cut).
    model, tokenizer = tiny_policy
    prompts = [[5], list(range(10, 40))]
    free = sampler.generate_ids(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12), seed=3)
    capped = sampler.generate_ids(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, max_total_tokens=36), seed=3)
    assert [c.token_ids for c in capped[0]] == [c.token_ids for c in free[0]]
    for c, f in zip(capped[1], free[1]):
        assert len(c.token_ids) <= 6 and c.token_ids == f.token_ids[: len(c.token_ids)]
        assert len(c.logprobs) == len(c.token_ids)
        if len(f.token_ids) > 6:
            assert c.finish_reason == "length"
    with pytest.raises(ValueError, match="no room"):
        sampler.generate_ids(prompts, SamplingParams(max_new_tokens=4, max_total_tokens=30), seed=0)
