"""The decode loop of the HF sampler: Hugging Face `generate`'s sampling, with finished rows dropped.

`generate` decodes every row of a batch until the last one ends, running a forward step for rows that already hit
EOS, a stop string or their budget. For Monte Carlo rollouts, whose lengths vary a lot, that padding was most of the
forward work (bench/mc_chain.py). Here a row leaves the batch, and the KV cache, as soon as it ends, and every row
stops at its own token budget.

The sampling is `generate`'s: log-probabilities and entropies of the full softmax at the temperature (what the loss
compares against), then temperature, top-k and top-p warpers (Hugging Face's own classes, in generate's order), and
a draw from what is left. The draw is an inverse-CDF sample from one uniform number per row and step, drawn for every
row of the batch whether it is still running or not, so a row's samples do not depend on when other rows ended (nor
on whether its prompt was prefilled once or n times).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Warpers:
    """How the next token is drawn from the logits: greedy, or sampled at `temperature` within top-k / top-p."""

    temperature: float
    top_k: int | None
    top_p: float

    def pick(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Next tokens [B] from logits [B, V] (float32) and one uniform in [0, 1) per row."""
        if self.temperature == 0.0:
            return logits.argmax(-1)
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        scores = logits
        if self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(None, scores)
        if self.top_k:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(self.top_p)(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(-1)
        # The first token whose cumulative probability exceeds u: never one of probability 0.
        picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype), right=True).squeeze(-1)
        return picked.clamp_(max=logits.shape[-1] - 1)


@dataclass
class DecodedRow:
    """One row's generated tokens (EOS or the stop string's last token included) and their log-probs and entropies
    at the sampling temperature (empty lists when not recorded)."""

    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    budgets: Sequence[int],
    warpers: Warpers,
    *,
    cache,
    cache_kwarg: str,
    eos_token_id: int | None,
    stop_criteria=None,
    record: bool = True,
) -> list[DecodedRow]:
    """Decode every row until EOS, a stop string or its budget, dropping rows as they end.

    Args:
        model: the causal LM.
        input_ids: [B, W] left-padded prompts.
        attention: [B, W] 1 for real tokens, 0 for left padding.
        budgets: B new-token budgets (>= 0).
        warpers: how a token is drawn.
        cache: a transformers `Cache` that already holds the first `cache.get_seq_length()` columns of every row
            (possibly none); the loop reads the rest, then one token per step.
        cache_kwarg: the model's name for the cache argument.
        eos_token_id: the token that ends a row.
        stop_criteria: Hugging Face's `StopStringCriteria`, called with each row's prompt and tokens so far (a stop
            string may begin in the prompt), or None.
        record: whether to record log-probs and entropies.

    Returns:
        B `DecodedRow`s, in order.
    """
    rows = attention.shape[0]
    out = [DecodedRow([], [], []) for _ in range(rows)]
    budget = torch.as_tensor(list(budgets), dtype=torch.long, device=attention.device)
    active = torch.nonzero(budget > 0).squeeze(-1)
    seen = input_ids
    step_ids = input_ids[:, cache.get_seq_length() :]
    if len(active) < rows:
        _select(cache, active)
        step_ids, attention, seen = step_ids[active], attention[active], seen[active]
    temperature = warpers.temperature or 1.0
    for step in range(int(budget.max().item()) if rows else 0):
        if len(active) == 0:
            break
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)[:, -step_ids.shape[1] :]
        logits = model(input_ids=step_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_kwarg: cache}).logits[:, -1].float()  # fmt: skip
        uniforms = torch.rand(rows, device=logits.device)[active]
        tokens = warpers.pick(logits, uniforms)
        for row, token in zip(active.tolist(), tokens.tolist()):
            out[row].tokens.append(token)
        if record:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            # A -inf logit has p = 0 and contributes nothing (0 * -inf would be NaN).
            entropy = -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)
            picked = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
            for row, lp, h in zip(active.tolist(), picked.tolist(), entropy.tolist()):
                out[row].logprobs.append(lp)
                out[row].entropies.append(h)
        seen = torch.cat([seen, tokens.unsqueeze(1)], dim=1)
        done = budget[active] <= step + 1
        if eos_token_id is not None:
            done |= tokens == eos_token_id
        if stop_criteria is not None:
            done |= stop_criteria(seen, None).to(done.device)
        step_ids = tokens.unsqueeze(1)
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
        if done.any():
            keep = torch.nonzero(~done).squeeze(-1)
            active, step_ids, attention, seen = active[keep], step_ids[keep], attention[keep], seen[keep]
            _select(cache, keep)
    return out


def _select(cache, indices: torch.Tensor) -> None:
    """Keep only the rows `indices` of the cache."""
    if cache.get_seq_length() > 0:
        cache.batch_select_indices(indices)
