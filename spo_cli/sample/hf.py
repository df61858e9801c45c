"""Sampling with Hugging Face `generate` (KV cache, batched, seeded): the embedded default backend.

n samples of one prompt share its prefill: the prompt is run through the model once and its KV cache
is repeated n times before decoding (`generate(num_return_sequences=n)` would prefill it n times).
For Monte Carlo rollouts from long prefixes that is most of the forward work (bench/mc_chain.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace

import torch

from spo_cli.hardware import Runtime
from spo_cli.sample.base import Completion, SamplingParams, encode_prompts, finish_response, new_token_budgets
from spo_cli.seeding import derive_seed


class HFSampler:
    """Generates with the live policy module, so it always samples the current weights (no sync step)."""

    def __init__(self, model, tokenizer, runtime: Runtime, generation_batch_size: int = 256, shared_prefill: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.generation_batch_size = generation_batch_size
        self.shared_prefill = shared_prefill  # False: generate's own n-fold prefill (the naive baseline)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seed: int, offset: int = 0
    ) -> list[list[Completion]]:
        """`params.n` completions for each prompt, with log-probs at the sampling temperature."""
        return self.generate_ids(self.encode_prompts(prompts), params, seed, offset)

    def shard_unit(self, params: SamplingParams) -> int:
        """Prompts per generate call: the rows of one call share one random stream."""
        return max(1, self.generation_batch_size // params.n)

    def sync_weights(self) -> None:
        """Nothing to do: generate runs the live policy module."""

    def sleep(self) -> None:
        """Nothing to free: the sampler holds no memory of its own between calls."""

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        offset: int = 0,
        caps: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """`params.n` completions for each token-id prompt (every prompt needs at least one token).

        Each generate call of `shard_unit(params)` prompts draws from its own seed, derived from `seed` and the
        index of its first prompt in the logical call (`offset` + its index here).
        """
        if not prompt_ids:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        per_call = self.shard_unit(params)
        budgets = new_token_budgets(prompt_ids, params, caps)
        raw: list[list[tuple[list[int], list[float], list[float]]]] = []
        was_training = self.model.training
        self.model.eval()
        # fork_rng keeps sampling from touching the process-wide RNG: each call's randomness is a
        # function of `seed` alone, which makes resumed runs sample exactly what uninterrupted ones do.
        devices = [torch.cuda.current_device()] if self.runtime.device == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                for start in range(0, len(prompt_ids), per_call):
                    torch.manual_seed(derive_seed(seed, "chunk", offset + start))
                    # One generate call runs to the chunk's largest budget; each row is cut to its own below,
                    # which samples the same distribution as a call with that row's budget.
                    chunk_params = replace(params, max_new_tokens=max(budgets[start : start + per_call]))
                    raw.extend(self._generate_chunk(prompt_ids[start : start + per_call], chunk_params))
        finally:
            self.model.train(was_training)
        completions = []
        for ids, budget, outs in zip(prompt_ids, budgets, raw):
            group = []
            for tokens, logprobs, entropies in outs:
                response, text, reason = finish_response(self.tokenizer, tokens[:budget], params, ids)
                group.append(
                    Completion(
                        prompt_token_ids=list(ids),
                        token_ids=response,
                        text=text,
                        finish_reason=reason,
                        logprobs=logprobs[: len(response)] if params.logprobs else [],
                        entropies=entropies[: len(response)] if params.logprobs else [],
                    )
                )
            completions.append(group)
        return completions

    @torch.no_grad()
    def _generate_chunk(
        self, prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[list[tuple[list[int], list[float], list[float]]]]:
        """Raw generated tokens (up to max_new_tokens, padding after the end), their log-probs and entropies."""
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        width = max(len(p) for p in prompt_ids)
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):
            input_ids[i, width - len(p) :] = torch.as_tensor(p)
            attention[i, width - len(p) :] = 1
        greedy = params.temperature == 0.0
        # Greedy decoding gives n identical copies: decode once and repeat (HF refuses n > 1 here).
        n_decode = 1 if greedy else params.n
        # A fresh config, so a checkpoint's generation_config (repetition_penalty, top_k, ...) cannot
        # make the sampling policy differ from the policy the loss trains.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n_decode,
            temperature=params.temperature if not greedy else None,
            top_p=params.top_p if not greedy else None,
            top_k=(params.top_k or None) if not greedy else None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            stop_strings=[*params.stop, *params.keep_stop] or None,
        )
        recorder = LogprobRecorder(params.temperature or 1.0) if params.logprobs else None
        input_ids, attention = input_ids.to(self.runtime.device), attention.to(self.runtime.device)
        extra = {}
        with self.runtime.autocast():
            if self.shared_prefill and n_decode > 1 and width > 1:
                input_ids, attention, extra = self._shared_prefill(input_ids, attention, n_decode)
                config.num_return_sequences = 1
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder] if recorder else []),
                tokenizer=tok if params.stop or params.keep_stop else None,
                **extra,
            )
        new = out[:, width:]
        if recorder:
            logprobs, entropies = (t.tolist() for t in recorder.finish(new))
        else:
            logprobs = entropies = [[] for _ in range(len(new))]
        rows = list(zip(new.tolist(), logprobs, entropies))
        if greedy:
            return [[rows[i]] * params.n for i in range(len(prompt_ids))]
        return [rows[i * params.n : (i + 1) * params.n] for i in range(len(prompt_ids))]

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, n: int):
        """Prefill every prompt but its last token once, then repeat the KV cache for n samples each.

        generate() then only runs the last prompt token (which yields the first sampled token's logits)
        and the decode steps. Returns the n-times repeated inputs and the generate() cache argument.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # The same positions generate() gives left-padded rows (pads sit at position 1 and are masked).
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
        name = self._cache_kwarg()
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
            **{name: cache},
        )
        cache.batch_repeat_interleave(n)
        return input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0), {name: cache}

    def _cache_kwarg(self) -> str:
        # transformers renamed `past_key_values` to `cache` (the old name warns and will go away).
        from spo_cli.lora import plain_model

        # A LoRA policy's PEFT wrapper takes **kwargs: the transformers model inside names the argument.
        params = inspect.signature(plain_model(self.model).forward).parameters
        return "cache" if "cache" in params else "past_key_values"


class LogprobRecorder:
    """A logits processor that records log pi(token) of every sampled token at `temperature`, and the
    entropy of each step's distribution at that temperature.

    generate() runs custom processors before its temperature/top-k/top-p warpers, so the scores seen
    here are the model's logits. The token sampled from step t's scores is only known at step t+1
    (or, for the last step, from the final sequences), so one step's log-softmax is kept at a time
    and only [B] floats per step are stored: the memory of a vocabulary-sized row per sequence, not
    per generated token.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # [B, V] log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # [B] per generated token
        self.entropies: list[torch.Tensor] = []  # [B] per generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        # A -inf logit has p = 0 and contributes nothing (0 * -inf would be NaN).
        self.entropies.append(-torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1))
        self.previous = logp
        return scores

    def finish(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-probs of `new_tokens` (the generated part of the sequences) and [B, T] entropies."""
        if self.previous is not None:
            last = new_tokens[:, len(self.steps) : len(self.steps) + 1]
            self.steps.append(self.previous.gather(1, last).squeeze(1))
            self.previous = None
        if not self.steps:
            zeros = torch.zeros(new_tokens.shape, dtype=torch.float32)
            return zeros, zeros.clone()
        return torch.stack(self.steps, dim=1).float().cpu(), torch.stack(self.entropies, dim=1).float().cpu()
