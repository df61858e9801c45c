"""The value network ("critic") of PPO: a transformer backbone and a linear value head, with its own optimizer.

The value of response token t is the head applied to the hidden state at the position that predicts token t,
i.e. V(state before token t), aligned like the policy's log-probs (`spo_cli.policy.TokenBatch`). The backbone
runs without an LM head: the vocabulary logits are the expensive part of a forward pass and a critic has no
use for them. The GAE math is in `spo_cli.estimate.gae`, the value loss in `spo_cli.estimate.critic.loss`.

A critic saved in a checkpoint is a folder `critic/` next to the policy's `model/`:
`config.json` (the backbone's), `model.safetensors` (backbone and head) and `optimizer.pt`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spo_cli.episode import Episode
from spo_cli.errors import SpoUserError
from spo_cli.policy import TokenBatch, collate
from spo_cli.recipe import Critic, Optim

CRITIC_DIR = "critic"
_WEIGHTS = "model.safetensors"
_OPTIMIZER = "optimizer.pt"


class ValueModel(torch.nn.Module):
    """A transformer backbone (no LM head) and a linear head from its hidden size to one value."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Values [B, S-1] in float32: position j is V(state before token j+1), as `TokenBatch` aligns log-probs."""
        hidden = self.backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state[:, :-1]
        return self.head(hidden).squeeze(-1).float()


@dataclass
class ValueCritic:
    """The critic as `ppo_update` trains it: the value model, its optimizer and its loss settings."""

    model: ValueModel
    optimizer: torch.optim.Optimizer
    vf_coef: float
    cliprange_value: float


def build_critic(policy, spec: Critic, optim: Optim, *, vocab_size: int, seed: int, device: str) -> ValueCritic:
    """A fresh critic: a copy of the policy's backbone (or `spec.value_model`) and a new value head.

    `vocab_size` is the number of token ids the policy's tokenizer can produce; a separately loaded backbone
    must embed all of them. The head is initialised like Hugging Face's token-classification heads (normal,
    std `initializer_range`, zero bias) from its own generator seeded by `seed`, so building a critic draws
    nothing from the global random streams a run's sampling depends on.
    """
    from spo_cli.seeding import derive_seed

    dtype = next(policy.parameters()).dtype
    if spec.value_model is None:
        backbone = copy.deepcopy(policy.base_model)
    else:
        from spo_cli.models import load_backbone

        backbone = load_backbone(spec.value_model, "estimator.critic.value_model", dtype)
        embedded = backbone.get_input_embeddings().num_embeddings
        if embedded < vocab_size:
            raise SpoUserError(
                f"`estimator.critic.value_model` ({spec.value_model}) embeds {embedded} token ids but the policy's "
                f"tokenizer has {vocab_size}: the critic must read the policy's tokens (use a model of the same family)"
            )
    config = backbone.config
    with torch.random.fork_rng(devices=[]):  # Linear's own initialisation is overwritten below
        head = torch.nn.Linear(config.hidden_size, 1, dtype=dtype)
    generator = torch.Generator().manual_seed(derive_seed(seed, "critic_head"))
    with torch.no_grad():
        std = getattr(config, "initializer_range", 0.02)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        head.bias.zero_()
    model = ValueModel(backbone, head).to(device)
    model.requires_grad_(True)
    return ValueCritic(model, _optimizer(model, spec, optim), spec.vf_coef, spec.cliprange_value)


def _optimizer(model: ValueModel, spec: Critic, optim: Optim) -> torch.optim.Optimizer:
    """AdamW at the critic's constant learning rate; betas, epsilon and weight decay as the policy's."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=spec.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
    )


@torch.no_grad()
def critic_values(
    model: ValueModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: str,
    autocast,
) -> list[list[float]]:
    """V(state before each response token) of every sequence, `batch_size` sequences a pass."""
    # Sorting by length keeps padding (wasted compute) low; the order is restored afterwards.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    values: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id).to(device)
        with autocast():
            out = model(batch)
        values.update(zip(idx, batch.gather(out)))
    return [values[i] for i in range(len(prompt_ids))]


def episode_values(model: ValueModel, *, pad_id: int, batch_size: int, device: str, autocast):
    """The `CriticValues` callable of `estimate_advantages`: the critic's values of episodes' response tokens."""

    def values(episodes: Sequence[Episode]) -> list[list[float]]:
        return critic_values(
            model,
            [ep.prompt_token_ids for ep in episodes],
            [ep.response_token_ids for ep in episodes],
            pad_id=pad_id,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
        )

    return values


def save_critic(critic: ValueCritic, directory: Path) -> None:
    """Write the backbone's config, the weights and the optimizer state into `directory` (created)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    critic.model.backbone.config.save_pretrained(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in critic.model.state_dict().items()}, directory / _WEIGHTS)
    torch.save(critic.optimizer.state_dict(), directory / _OPTIMIZER)


def load_critic(directory: Path, spec: Critic, optim: Optim, *, device: str) -> ValueCritic:
    """The critic saved in `directory` by `save_critic`, weights and optimizer state exactly as they were.

    The backbone is rebuilt from the saved config, so resuming does not need `spec.value_model` again; the
    loss settings come from `spec`.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    if not (directory / _WEIGHTS).is_file() or not (directory / "config.json").is_file():
        raise SpoUserError(f"{directory}: not a saved critic (needs config.json and {_WEIGHTS}; a gae run writes one "
                           f"into every checkpoint as {CRITIC_DIR}/)")  # fmt: skip
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    weights = load_file(directory / _WEIGHTS)
    dtype = weights["head.weight"].dtype
    # The random initialisation is overwritten at once; forking keeps it off the run's random streams.
    with torch.random.fork_rng(devices=[]):
        backbone = AutoModel.from_config(config, dtype=dtype)
        head = torch.nn.Linear(config.hidden_size, 1, dtype=dtype)
    model = ValueModel(backbone, head)
    model.load_state_dict(weights, strict=True)
    model.to(device).requires_grad_(True)
    optimizer = _optimizer(model, spec, optim)
    if (directory / _OPTIMIZER).is_file():
        optimizer.load_state_dict(torch.load(directory / _OPTIMIZER, map_location="cpu", weights_only=True))
    return ValueCritic(model, optimizer, spec.vf_coef, spec.cliprange_value)
