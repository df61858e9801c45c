"""The pad-free update: `pack` reads each prompt once and computes logits only where a response token is predicted;
its log-probabilities, entropies, gradients and a whole PPO update equal the right-padded layout's up to float
rounding."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from spo_cli.episode import Episode, Segment
from spo_cli.hardware import Runtime
from spo_cli.optimize.learner import LocalLearner
from spo_cli.optimize.loss import LossInputs, ppo_clip_loss
from spo_cli.optimize.schedule import build_scheduler
from spo_cli.optimize.step import mini_batch_plan, ppo_update
from spo_cli.policy import collate, forward_logprobs, pack, packed_logprobs
from spo_cli.recipe import PpoClip, Train


def test_pack_lays_out_each_prompt_once_with_its_responses():
    batch = pack([[5, 6], [5, 6], [7]], [[1, 2], [3], [4, 8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 1, 2, 3], [7, 4, 8, 0, 0]]
    # Each response continues its prompt's positions.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    # Response token j is predicted at the position before it: the prompt's last token for j = 0.
    predicted_at = list(zip(batch.hidden_rows.tolist(), batch.hidden_cols.tolist()))
    assert predicted_at == [(0, 1), (0, 2), (0, 1), (1, 0), (1, 1)]
    assert batch.labels.tolist() == [1, 2, 3, 4, 8]
    attend = batch.attention_mask[:, 0]
    assert attend[0, 4].tolist() == [True, True, False, False, True]  # token 3 sees the prompt and itself only
    assert attend[0, 3].tolist() == [True, True, True, True, False]
    assert attend[1, 3].tolist() == [False, False, False, True, False]  # padding sees itself (no NaN row)
    assert batch.response_mask.tolist() == [[1, 1], [1, 0], [1, 1]]
    assert batch.tokens == 10


def test_without_shared_prompts_every_pair_has_its_own_row():
    batch = pack([[5, 6], [5, 6]], [[1, 2], [3]], pad_id=0, shared_prompts=False)
    assert batch.input_ids.tolist() == [[5, 6, 1, 2], [5, 6, 3, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.position_ids is None
    assert list(zip(batch.hidden_rows.tolist(), batch.hidden_cols.tolist())) == [(0, 1), (0, 2), (1, 1)]


def sample_pairs(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Three prompts of 1-11 tokens, three responses each of 0-8 tokens, interleaved."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    responses = [[rng.randrange(3, 200) for _ in range(rng.randrange(0, 9))] for _ in range(9)]
    return [prompts[k % 3] for k in range(9)], responses


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shared", [True, False])
def test_packed_log_probs_entropies_and_gradients_equal_the_padded_ones(arch, attention, shared):
    from spo_cli.models import build_byte_tokenizer, build_tiny_model
    from spo_cli.recipe import TinyModel

    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(TinyModel(arch=arch, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                       num_key_value_heads=1), tokenizer, seed=0)  # fmt: skip
    model.config._attn_implementation = attention
    prompts, responses = sample_pairs(1)

    padded = collate(prompts, responses, pad_id=0)
    logprobs, entropy = forward_logprobs(model, padded, 0.7, with_entropy=True)
    (logprobs * padded.response_mask * torch.linspace(0.5, 1.5, logprobs.shape[1])).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    packed = pack(prompts, responses, pad_id=0, shared_prompts=shared)
    got, got_entropy = packed_logprobs(model, packed, 0.7, with_entropy=True)
    # The same weights per token: position j of response i sits at column p_i - 1 + j of the padded layout.
    weights = packed.scatter([padded.gather(torch.linspace(0.5, 1.5, logprobs.shape[1]).expand_as(logprobs))[i]
                              for i in range(len(responses))])  # fmt: skip
    (got * packed.response_mask * weights).sum().backward()

    for want, have in ((padded.gather(logprobs), packed.gather(got)), (padded.gather(entropy), packed.gather(got_entropy))):
        assert [len(r) for r in have] == [len(r) for r in responses]
        assert max(abs(a - b) for x, y in zip(want, have) for a, b in zip(x, y)) < 1e-5
    for want, p in zip(want_grads, model.parameters()):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5)
    if shared:
        assert packed.tokens < padded.input_ids.numel()


def episodes_of_two_groups() -> list[Episode]:
    prompts, responses = sample_pairs(2)
    rng = random.Random(3)
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        advantage = rng.choice([-1.0, 0.5, 1.0])
        out.append(Episode(
            id=f"e{i}", group_id=f"g{i % 3}", prompt="p", response="r", prompt_token_ids=p, response_token_ids=r,
            response_logprobs=[-rng.uniform(1.0, 6.0) for _ in r], finish_reason="stop", reward=1.0,
            segments=[Segment(start=0, end=len(r), advantage=advantage)] if r else [],
            token_advantages=[advantage] * len(r),
        ))  # fmt: skip
    return out


def test_a_ppo_update_equals_the_padded_loss_over_the_whole_mini_batch(tiny_policy):
    """One optimizer step (SGD) over 9 episodes in micro-batches of 2, regrouped by prompt, against one right-padded
    forward and backward of the token-mean PPO-clip loss over all of them."""
    model, _ = tiny_policy
    episodes = episodes_of_two_groups()

    policy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    learner = LocalLearner(policy, optimizer, build_scheduler(optimizer, total_steps=1, warmup_steps=0,
                                                               kind="constant"), max_grad_norm=1e9)  # fmt: skip
    metrics = ppo_update(
        learner, episodes, loss=PpoClip(epsilon=0.2), train=Train(per_device_train_batch_size=2, gradient_accumulation_steps=5),
        temperature=1.0, runtime=Runtime("cpu", bf16=False), pad_id=0, rng=random.Random(0),
    )  # fmt: skip
    assert metrics["optimizer_steps"] == 1

    reference = copy.deepcopy(model).train()
    batch = collate([e.prompt_token_ids for e in episodes], [e.response_token_ids for e in episodes], pad_id=0)
    logprobs, _ = forward_logprobs(reference, batch, 1.0)
    out = ppo_clip_loss(
        LossInputs(logprobs=logprobs, old_logprobs=batch.scatter([e.response_logprobs for e in episodes]),
                   advantages=batch.scatter([e.token_advantages for e in episodes]), mask=batch.response_mask),
        epsilon_low=0.2, epsilon_high=0.2, beta=0.0, normalizer=float(batch.response_mask.sum()),
    )  # fmt: skip
    out.loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(reference.parameters(), model.parameters()))
    assert moved > 1e-4, "the update must move the weights for the comparison to mean anything"
    for want, have in zip(reference.parameters(), policy.parameters()):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def layout(keys: list[str], prompt_lengths: list[int], response_lengths: list[int], group: bool = True):
    from spo_cli.optimize.step import PromptLayout

    return PromptLayout(keys, prompt_lengths, response_lengths, group_by_prompt=group)


def test_micro_batches_hold_episodes_of_one_prompt_together():
    keys = ["a", "b", "c", "a", "b", "c", "a", "b"]
    train = Train(per_device_train_batch_size=3, gradient_accumulation_steps=3, shuffle_episodes=False)
    sizes = layout(keys, [5] * 8, [2] * 8)
    grouped = mini_batch_plan([1] * 8, [0] * 8, train, "token_mean", 0, 1, random.Random(0), sizes)
    assert [m.indices for m in grouped[0].micro_batches] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    plain = mini_batch_plan([1] * 8, [0] * 8, train, "token_mean", 0, 1, random.Random(0), layout(keys, [5] * 8, [2] * 8, False))
    assert [m.indices for m in plain[0].micro_batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert grouped[0].normalizer == plain[0].normalizer == 8.0


def test_a_token_budget_cuts_micro_batches_by_packed_tokens():
    # Prompt "a" (10 tokens) with responses of 3, 4 and 30 tokens; prompt "b" (6) with 2 and 2.
    keys, prompts, responses = ["a", "a", "b", "a", "b"], [10, 10, 6, 10, 6], [3, 4, 2, 30, 2]
    train = Train(per_device_train_batch_size=1, gradient_accumulation_steps=5, shuffle_episodes=False,
                  max_tokens_per_micro_batch=20)  # fmt: skip
    plan = mini_batch_plan([1] * 5, [0] * 5, train, "token_mean", 0, 1, random.Random(0), layout(keys, prompts, responses))
    # grouped: a0 a1 a3 b2 b4 -> [a0 a1] = 10+3+4 = 17; a3 = 40 alone (over the budget); [b2 b4] = 6+2+2 = 10
    assert [m.indices for m in plan[0].micro_batches] == [[0, 1], [3], [2, 4]]
    assert all(m.real for m in plan[0].micro_batches)


def test_with_a_token_budget_every_process_runs_as_many_micro_batches_as_the_busiest():
    train = Train(per_device_train_batch_size=2, gradient_accumulation_steps=2, shuffle_episodes=False,
                  max_tokens_per_micro_batch=12)  # fmt: skip
    # 8 episodes, distinct prompts of 5 tokens; rank 0 gets responses of 1 token (two fit per micro-batch), rank 1
    # responses of 6 tokens (one fits).
    sizes = layout([str(i) for i in range(8)], [5] * 8, [1, 6] * 4)
    plans = [mini_batch_plan([1] * 8, [0] * 8, train, "token_mean", r, 2, random.Random(0), sizes) for r in (0, 1)]
    assert [m.indices for m in plans[1][0].micro_batches] == [[1], [3], [5], [7]]
    assert [(m.indices, m.real) for m in plans[0][0].micro_batches] == [
        ([0, 2], True), ([4, 6], True), ([0], False), ([0], False)
    ]


def test_prompts_are_shared_through_ddp_and_deepspeed_wrappers(tiny_policy):
    """A DeepSpeed engine's own `config` is DeepSpeed's, not the model's: the attention implementation and the LM
    head are read from the module inside."""
    from spo_cli.policy import _output_embedding, shares_prompts

    model, _ = tiny_policy

    class Engine(torch.nn.Module):  # what DDP and DeepSpeedEngine look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = {"zero_optimization": {"stage": 2}}

    assert shares_prompts(model) and shares_prompts(Engine(model))
    assert _output_embedding(Engine(model)) is model.get_output_embeddings()
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    assert not shares_prompts(Engine(flash))
