"""The value network: alignment of its values, building, saving/loading, and training inside `ppo_update`."""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch

from spo_cli.estimate.critic.model import build_critic, critic_values, load_critic, save_critic
from spo_cli.errors import SpoUserError
from spo_cli.estimate.gae import estimate_gae
from spo_cli.policy import collate
from spo_cli.recipe import Critic, Optim, PpoClip, Train

from .test_episode import make_episode


def new_critic(tiny_policy, **spec):
    model, tokenizer = tiny_policy
    return build_critic(model, Critic(**spec), Optim(), vocab_size=len(tokenizer), seed=0, device="cpu")


def values_of(critic, prompts, responses):
    return critic_values(
        critic.model, prompts, responses, pad_id=0, batch_size=8, device="cpu", autocast=contextlib.nullcontext
    )


def test_value_of_a_token_is_read_where_the_policy_predicts_it(tiny_policy):
    critic = new_critic(tiny_policy)
    prompt, response = [5, 6, 7], [8, 9, 10]
    (values,) = values_of(critic, [prompt], [response])
    with torch.no_grad():
        hidden = critic.model.backbone(input_ids=torch.tensor([prompt + response])).last_hidden_state[0]
        # V(before response token t) comes from the position of the last token before it: len(prompt) - 1 + t.
        expected = critic.model.head(hidden[2:5]).squeeze(-1)
    assert values == pytest.approx(expected.tolist(), abs=1e-6)
    # batched with a longer, right-padded sequence and a shorter one, the values stay the same
    batched = values_of(critic, [[1, 2, 3, 4, 5, 6, 7], prompt, [4]], [[9] * 6, response, [3]])
    assert batched[1] == pytest.approx(values, abs=1e-5) and [len(v) for v in batched] == [6, 3, 1]


def test_a_new_critic_copies_the_policy_backbone_and_draws_no_global_randomness(tiny_policy):
    policy, _ = tiny_policy
    before = torch.get_rng_state()
    critic = new_critic(tiny_policy)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, a), (_, b) in zip(policy.base_model.named_parameters(), critic.model.backbone.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    # the head's initialisation is a function of the seed
    assert torch.equal(new_critic(tiny_policy).model.head.weight, critic.model.head.weight)
    assert critic.optimizer.param_groups[0]["lr"] == Critic().learning_rate


def test_value_model_from_a_directory_and_its_errors(tiny_policy, tmp_path):
    from spo_cli.models import save_model

    policy, tokenizer = tiny_policy
    save_model(policy, tokenizer, tmp_path / "lm")
    critic = new_critic(tiny_policy, value_model=str(tmp_path / "lm"))
    for (name, a), (_, b) in zip(policy.base_model.named_parameters(), critic.model.backbone.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(SpoUserError, match=r"estimator.critic.value_model.*no such model directory"):
        new_critic(tiny_policy, value_model=str(tmp_path / "missing"))
    with pytest.raises(SpoUserError, match="estimator.critic.value_model"):
        new_critic(tiny_policy, value_model="nobody/no-such-model")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(SpoUserError, match="embeds 259 token ids"):
        build_critic(policy, Critic(value_model=str(tmp_path / "lm")), Optim(), vocab_size=10**6, seed=0, device="cpu")


def one_step(critic, seed):
    """One optimizer step of the critic on a made-up loss over random tokens."""
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(seed))
    batch = collate(ids[:, :3].tolist(), ids[:, 3:].tolist(), pad_id=0)
    critic.model(batch).square().mean().backward()
    critic.optimizer.step()
    critic.optimizer.zero_grad()


def test_save_and_load_restore_the_critic_exactly(tiny_policy, tmp_path):
    critic = new_critic(tiny_policy, learning_rate=1e-3)
    one_step(critic, seed=1)
    save_critic(critic, tmp_path / "critic")
    loaded = load_critic(tmp_path / "critic", Critic(learning_rate=1e-3), Optim(), device="cpu")
    for key, value in critic.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    # the optimizer state is restored too: one more step keeps the two identical
    one_step(critic, seed=2)
    one_step(loaded, seed=2)
    for key, value in critic.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    with pytest.raises(SpoUserError, match="not a saved critic"):
        load_critic(tmp_path, Critic(), Optim(), device="cpu")


def gae_episodes(critic, n=4):
    episodes = [
        make_episode(
            id=str(i), prompt_token_ids=[5, 6, 7 + i], response_token_ids=[8, 9 + i, 10], reward=float(i % 2),
            segments=[{"start": 0, "end": 3}],
        )  # fmt: skip
        for i in range(n)
    ]
    values = values_of(critic, [ep.prompt_token_ids for ep in episodes], [ep.response_token_ids for ep in episodes])
    return estimate_gae(episodes, values, gamma=1.0, lam=0.95)[0]


def test_ppo_update_trains_the_critic(tiny_policy):
    from spo_cli.hardware import Runtime
    from spo_cli.optimize.learner import LocalLearner
    from spo_cli.optimize.schedule import build_scheduler
    from spo_cli.optimize.step import ppo_update

    policy = copy.deepcopy(tiny_policy[0])
    critic = new_critic(tiny_policy, learning_rate=1e-3)
    episodes = gae_episodes(critic)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=0, kind="constant")
    learner = LocalLearner(policy, optimizer, scheduler, max_grad_norm=1.0)
    head_before = critic.model.head.weight.detach().clone()
    backbone_before = critic.model.backbone.embed_tokens.weight.detach().clone()

    def update(episodes, critic):
        return ppo_update(
            learner, episodes, loss=PpoClip(), temperature=1.0,
            train=Train(per_device_train_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2),
            runtime=Runtime("cpu", bf16=False), pad_id=0, rng=random.Random(0), critic=critic,
        )  # fmt: skip

    metrics = update(episodes, critic)
    assert metrics["optimizer_steps"] == 2
    for key in ("value_loss", "value_grad_norm", "value_mean"):
        assert math.isfinite(metrics[key]) and metrics[key] != 0, key
    assert 0 <= metrics["value_clipfrac"] <= 1
    assert not torch.equal(critic.model.head.weight, head_before)
    assert not torch.equal(critic.model.backbone.embed_tokens.weight, backbone_before)
    bare = [ep.model_copy(update={"value_targets": None}) for ep in episodes]
    with pytest.raises(ValueError, match="value_targets"):
        update(bare, critic)


def test_zero_advantage_episodes_stay_when_the_critic_learns_from_them():
    from spo_cli.optimize.step import select_trainable

    flat = make_episode(token_advantages=[0.0] * 3, value_targets=[1.0, 1.0, None], response_values=[0.5] * 3)
    moving = make_episode(id="e1", token_advantages=[0.0, 0.1, 0.0])
    assert select_trainable([flat, moving], PpoClip()) == [moving]
    assert select_trainable([flat, moving], PpoClip(), train_critic=True) == [flat, moving]
    unvalued = flat.model_copy(update={"value_targets": [None] * 3})
    assert select_trainable([unvalued, moving], PpoClip(), train_critic=True) == [moving]
