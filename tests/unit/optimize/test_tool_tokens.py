"""Tool tokens in the update: a token a tool wrote is never trained, whatever advantage it carries."""

from __future__ import annotations

import copy
import random

import torch

from spo_cli.episode import Episode, Segment
from spo_cli.hardware import Runtime
from spo_cli.optimize.learner import LocalLearner
from spo_cli.optimize.schedule import build_scheduler
from spo_cli.optimize.step import ppo_update, trained_token_count
from spo_cli.recipe import PpoClip, Train


def tool_episode(tool_advantage: float) -> Episode:
    # tokens 3..6 are a tool's output (placeholder log-probs 0); the policy's tokens carry advantage 0.5
    advantages = [0.5, 0.5, 0.5, tool_advantage, tool_advantage, tool_advantage, 0.5, 0.5]
    return Episode(
        id="e", group_id="g", prompt="p", response="r", prompt_token_ids=[65, 66], response_token_ids=list(range(70, 78)),
        response_logprobs=[-1.0, -1.2, -0.8, 0.0, 0.0, 0.0, -1.1, -0.9], finish_reason="stop", reward=1.0,
        tool_spans=[(3, 6)], segments=[Segment(start=0, end=8, advantage=0.5)], token_advantages=advantages,
    )  # fmt: skip


def updated_weights(model, episode: Episode) -> list[torch.Tensor]:
    policy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    learner = LocalLearner(policy, optimizer, build_scheduler(optimizer, total_steps=1, warmup_steps=0,
                                                               kind="constant"), max_grad_norm=1e9)  # fmt: skip
    metrics = ppo_update(
        learner, [episode], loss=PpoClip(), train=Train(per_device_train_batch_size=1), temperature=1.0,
        runtime=Runtime("cpu", bf16=False), pad_id=0, rng=random.Random(0),
    )  # fmt: skip
    assert metrics["optimizer_steps"] == 1
    return [p.detach().clone() for p in policy.parameters()]


def test_a_tool_token_with_a_huge_advantage_changes_no_gradient(tiny_policy):
    model, _ = tiny_policy
    plain = updated_weights(model, tool_episode(0.0))
    huge = updated_weights(model, tool_episode(1e6))
    assert all(torch.equal(a, b) for a, b in zip(plain, huge))
    moved = updated_weights(model, tool_episode(1e6).model_copy(update={"tool_spans": []}))
    assert not all(torch.equal(a, b) for a, b in zip(plain, moved)), "without the span those tokens are trained"


def test_tool_tokens_are_not_counted_as_trained():
    episode = tool_episode(0.0)
    assert trained_token_count(episode, None) == 5
    assert trained_token_count(episode, 0.9) == 5  # every policy token has p < 0.9; the tool's p = 1 anyway
