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


@dataclass
class PackedBatch:
    """Episodes laid out for the update with no wasted forward work: each distinct prompt once per row, followed by
    every response to it, each response attending to that prompt and to itself only; the LM head runs only at
    the positions that predict a response token.

    The log-probabilities it yields are laid out [B, R]: row i holds episode i's response tokens from position 0
    (`response_mask` marks them), so per-episode aggregations (rows) mean what they mean for `TokenBatch`.

    With `shared_prompts` False (an attention implementation that cannot take a 4-D mask, e.g. FlashAttention)
    every episode gets its own right-padded row, and only the LM-head saving remains.
    """

    input_ids: torch.Tensor  # [G, L]
    attention_mask: torch.Tensor  # [G, 1, L, L] bool (True: attend) when shared_prompts, else [G, L] 0/1
    position_ids: torch.Tensor | None  # [G, L] when shared_prompts
    hidden_rows: torch.Tensor  # [N] row of the hidden state that predicts each response token, episode by episode
    hidden_cols: torch.Tensor  # [N] its column
    labels: torch.Tensor  # [N] the response tokens
    response_mask: torch.Tensor  # [B, R] 1 at response tokens
    response_lengths: list[int]

    def to(self, device: str) -> PackedBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(*(move(t) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                               self.hidden_rows, self.hidden_cols, self.labels, self.response_mask)),
                           self.response_lengths)  # fmt: skip

    @property
    def tokens(self) -> int:
        """Positions the forward pass computes (padding included)."""
        return self.input_ids.numel()

    def scatter(self, per_response: Sequence[Sequence[float]], dtype=torch.float32) -> torch.Tensor:
        """Per-response-token values as [B, R] (zeros past each response's end)."""
        out = torch.zeros(self.response_mask.shape, dtype=dtype)
        for i, values in enumerate(per_response):
            if len(values):
                out[i, : len(values)] = torch.as_tensor(values, dtype=dtype)
        return out.to(self.response_mask.device)

    def gather(self, tensor: torch.Tensor) -> list[list[float]]:
        """Inverse of `scatter`."""
        rows = tensor.detach().float().cpu()
        return [rows[i, :n].tolist() for i, n in enumerate(self.response_lengths)]

    def place(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] values, episode by episode, as [B, R] (differentiable; zeros past each response's end)."""
        width = self.response_mask.shape[1]
        index = torch.cat([torch.arange(n, device=flat.device) + i * width for i, n in enumerate(self.response_lengths)])
        out = flat.new_zeros(self.response_mask.numel())
        return out.index_put((index,), flat).view(self.response_mask.shape)


def pack(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, shared_prompts: bool = True
) -> PackedBatch:
    """Lay out (prompt, response) pairs as a `PackedBatch`: one row per distinct prompt (in order of first
    appearance) holding the prompt and then each of its responses, rows right-padded to the longest; or, without
    `shared_prompts`, one right-padded row per pair. Every prompt must have at least one token."""
    if any(not p for p in prompt_ids):
        raise ValueError("every sequence needs at least one prompt token")
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        rows.setdefault(tuple(p) if shared_prompts else (i,), []).append(i)
    lengths = [len(prompt_ids[m[0]]) + sum(len(response_ids[i]) for i in m) for m in rows.values()]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    attend = torch.zeros((len(rows), width, width), dtype=torch.bool) if shared_prompts else None
    hidden_at: list[tuple[int, list[int]]] = [(0, [])] * len(prompt_ids)
    for g, members in enumerate(rows.values()):
        prompt = list(prompt_ids[members[0]])
        p = len(prompt)
        input_ids[g, :p] = torch.as_tensor(prompt)
        positions[g, :p] = torch.arange(p)
        if attend is not None:
            attend[g, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        start = p
        for i in members:
            r = len(response_ids[i])
            input_ids[g, start : start + r] = torch.as_tensor(list(response_ids[i]), dtype=torch.long)
            positions[g, start : start + r] = torch.arange(p, p + r)
            if attend is not None:
                attend[g, start : start + r, :p] = True
                attend[g, start : start + r, start : start + r] = torch.ones(r, r, dtype=torch.bool).tril()
            # Token j of the response is predicted at position j - 1 of the sequence prompt + response.
            hidden_at[i] = (g, ([p - 1] + list(range(start, start + r - 1)))[:r])
            start += r
        if attend is not None:
            # A padding query attending to nothing would be NaN in the softmax, and NaN poisons the backward pass.
            pad = torch.arange(start, width)
            attend[g, pad, pad] = True
    response_lengths = [len(r) for r in response_ids]
    response_mask = torch.zeros((len(prompt_ids), max(response_lengths, default=0)), dtype=torch.float32)
    for i, n in enumerate(response_lengths):
        response_mask[i, :n] = 1.0
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attend.unsqueeze(1) if attend is not None else (torch.arange(width) < torch.tensor(lengths)[:, None]).long(),
        position_ids=positions if shared_prompts else None,
        hidden_rows=torch.as_tensor([g for g, cols in hidden_at for _ in cols], dtype=torch.long),
        hidden_cols=torch.as_tensor([c for _, cols in hidden_at for c in cols], dtype=torch.long),
        labels=torch.as_tensor([t for r in response_ids for t in r], dtype=torch.long),
        response_mask=response_mask,
        response_lengths=response_lengths,
    )


def shares_prompts(model) -> bool:
    """Whether `model`'s attention takes the 4-D mask `pack` builds to share prompts (eager and SDPA do;
    FlashAttention kernels take no arbitrary mask)."""
    return _attention_implementation(model) in ("sdpa", "eager")


def _attention_implementation(model) -> str | None:
    return getattr(getattr(_unwrapped(model), "config", None), "_attn_implementation", None)


def _unwrapped(model):
    """The model inside DDP and DeepSpeed wrappers (`.module`: a DeepSpeed engine's own `config` is DeepSpeed's);
    PEFT wrappers pass the model's attributes through."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def packed_logprobs(
    model, batch: PackedBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [B, R] of every response token at `temperature` (and entropies if asked), laid out as
    `batch.response_mask`. The LM head sees only the [N] hidden states that predict a response token: a hook on
    the output embedding picks them, so no logits are computed at prompt or padding positions."""
    head = _output_embedding(model)
    mask = batch.attention_mask
    if mask.dim() == 4 and _attention_implementation(model) == "eager":
        # Eager attention adds its mask to the scores: an additive mask, not a boolean one.
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    rows, cols = batch.hidden_rows, batch.hidden_cols
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][rows, cols].unsqueeze(1), *args[1:]))
    try:
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits  # [N, 1, V]: one token per row keeps token_log_probs' chunks small
    finally:
        handle.remove()
    logprobs = token_log_probs(logits, batch.labels.unsqueeze(1), temperature).squeeze(1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = batch.place(token_entropy(logits.detach(), temperature).squeeze(1))
    return batch.place(logprobs), entropy


def _output_embedding(model) -> torch.nn.Module:
    """The LM head of `model`, through DDP/DeepSpeed (`.module`) and PEFT wrappers."""
    model = _unwrapped(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) to score tokens with")
    return head


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
    # Identical prompts side by side (`pack` reads each once per pass), and similar lengths together (less
    # padding); the order is restored afterwards.
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), tuple(prompt_ids[i]), len(response_ids[i])))
    shared = shares_prompts(model)
    scored: dict[int, list[float]] = {}
    entropies: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pack([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id, shared).to(device)
        with autocast():
            logprobs, entropy = packed_logprobs(model, batch, temperature, with_entropy=with_entropy)
        scored.update(zip(idx, batch.gather(logprobs)))
        if entropy is not None:
            entropies.update(zip(idx, batch.gather(entropy)))
    n = len(prompt_ids)
    return [scored[i] for i in range(n)], ([entropies[i] for i in range(n)] if with_entropy else None)
