"""Turning (prompt, response) token lists into padded tensors and per-token log-probabilities.

The sampler's scoring pass and the optimizer use the same functions, so pi_old recorded at sampling
time is exactly what the loss recomputes for an unchanged model (ratio 1 on the first mini-batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spo_cli.optimize.loss import token_entropy, token_log_probs


@dataclass
class TokenBatch:
    """Right-padded sequences prompt + response, with everything aligned to next-token positions.

    Position j of the [B, S-1] tensors scores token j+1 of `input_ids`.
    """

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    response_mask: torch.Tensor  # [B, S-1] 1 where the target token is a response token
    prompt_lengths: list[int]
    response_lengths: list[int]

    def to(self, device: str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.prompt_lengths,
            self.response_lengths,
        )

    def scatter(self, per_response: Sequence[Sequence[float]], dtype=torch.float32) -> torch.Tensor:
        """Place per-response-token values at their [B, S-1] positions (zeros elsewhere)."""
        out = torch.zeros(self.response_mask.shape, dtype=dtype)
        for i, (p, values) in enumerate(zip(self.prompt_lengths, per_response)):
            if len(values):
                out[i, p - 1 : p - 1 + len(values)] = torch.as_tensor(values, dtype=dtype)
        return out.to(self.response_mask.device)

    def gather(self, tensor: torch.Tensor) -> list[list[float]]:
        """Inverse of `scatter`: per-response-token values from a [B, S-1] tensor."""
        rows = tensor.detach().float().cpu()
        return [
            rows[i, p - 1 : p - 1 + n].tolist() for i, (p, n) in enumerate(zip(self.prompt_lengths, self.response_lengths))
        ]


def collate(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Right-pad prompt + response sequences. Every prompt must have at least one token."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(lengths)
    batch = len(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p:
            raise ValueError("every sequence needs at least one prompt token")
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        response_mask[i, len(p) - 1 : len(seq) - 1] = 1.0
    return TokenBatch(input_ids, attention, response_mask, [len(p) for p in prompt_ids], [len(r) for r in response_ids])


def forward_logprobs(
    model, batch: TokenBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [B, S-1] of each next token at `temperature` (and entropies if asked).

    Right padding needs no position_ids: padding sits after every real token, so causal attention
    never lets a real token see it.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
    labels = batch.input_ids[:, 1:]
    logprobs = token_log_probs(logits, labels, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), temperature)
    return logprobs, entropy


@torch.no_grad()
def score_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    temperature: float,
    batch_size: int,
    device: str,
    autocast,
    with_entropy: bool = False,
) -> tuple[list[list[float]], list[list[float]] | None]:
    """log pi(y_t | x, y_<t) for every response token (and the entropy at each), `batch_size` sequences a pass."""
    # Sorting by length keeps padding (wasted compute) low; the order is restored afterwards.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    scored: dict[int, list[float]] = {}
    entropies: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id).to(device)
        with autocast():
            logprobs, entropy = forward_logprobs(model, batch, temperature, with_entropy=with_entropy)
        scored.update(zip(idx, batch.gather(logprobs)))
        if entropy is not None:
            entropies.update(zip(idx, batch.gather(entropy)))
    n = len(prompt_ids)
    return [scored[i] for i in range(n)], ([entropies[i] for i in range(n)] if with_entropy else None)
