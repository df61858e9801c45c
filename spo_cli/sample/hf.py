"""Sampling with the live policy module and a KV cache (batched, seeded): the embedded default backend.

n samples of one prompt share its prefill: the prompt is run through the model once and its KV cache is repeated n
times before decoding (`generate(num_return_sequences=n)` would prefill it n times). For Monte Carlo rollouts from
long prefixes that is most of the forward work (bench/mc_chain.py). The decode loop (`spo_cli.sample.decode`) samples
as Hugging Face's `generate` does and drops each row from the batch as soon as it ends.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from spo_cli.hardware import Runtime
from spo_cli.sample.base import Completion, SamplingParams, encode_prompts, finish_response, new_token_budgets
from spo_cli.sample.decode import Warpers, decode
from spo_cli.seeding import derive_seed


class HFSampler:
    """Generates with the live policy module, so it always samples the current weights (no sync step)."""

    def __init__(self, model, tokenizer, runtime: Runtime, generation_batch_size: int = 256, shared_prefill: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.generation_batch_size = generation_batch_size
        self.shared_prefill = shared_prefill  # False: every sample prefills its prompt (the naive baseline)
        self._stop_checks: dict[tuple[str, ...], object] = {}

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
                    chunk = slice(start, start + per_call)
                    raw.extend(self._generate_chunk(prompt_ids[chunk], params, budgets[chunk]))
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
        self, prompt_ids: list[list[int]], params: SamplingParams, budgets: list[int]
    ) -> list[list[tuple[list[int], list[float], list[float]]]]:
        """`params.n` raw generations per prompt (each up to its prompt's budget), their log-probs and entropies."""
        from transformers import DynamicCache

        tok = self.tokenizer
        width = max(len(p) for p in prompt_ids)
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):
            input_ids[i, width - len(p) :] = torch.as_tensor(p)
            attention[i, width - len(p) :] = 1
        greedy = params.temperature == 0.0
        # Greedy decoding gives n identical copies: decode once and repeat.
        n_decode = 1 if greedy else params.n
        input_ids, attention = input_ids.to(self.runtime.device), attention.to(self.runtime.device)
        # A fresh cache and explicit sampling settings, so a checkpoint's generation_config (repetition_penalty,
        # top_k, ...) cannot make the sampling policy differ from the policy the loss trains.
        cache = DynamicCache(config=self.model.config)
        name = self._cache_kwarg()
        with self.runtime.autocast():
            if self.shared_prefill and n_decode > 1 and width > 1:
                self._prefill(input_ids[:, :-1], attention[:, :-1], cache, name)
                cache.batch_repeat_interleave(n_decode)
            decoded = decode(
                self.model,
                input_ids.repeat_interleave(n_decode, dim=0),
                attention.repeat_interleave(n_decode, dim=0),
                [b for b in budgets for _ in range(n_decode)],
                Warpers(params.temperature, params.top_k or None, params.top_p),
                cache=cache,
                cache_kwarg=name,
                eos_token_id=tok.eos_token_id,
                stop_criteria=self._stop_criteria((*params.stop, *params.keep_stop)),
                record=params.logprobs,
            )
        rows = [(d.tokens, d.logprobs, d.entropies) for d in decoded]
        if greedy:
            return [[rows[i]] * params.n for i in range(len(prompt_ids))]
        return [rows[i * params.n : (i + 1) * params.n] for i in range(len(prompt_ids))]

    def _prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, cache, name: str) -> None:
        """Run every prompt but its last token into `cache` once; repeated n times, it serves the n samples, and the
        decode loop then reads only the last prompt token (which yields the first sampled token's logits)."""
        # The positions generate() gives left-padded rows (pads sit at position 1 and are masked).
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
        self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{name: cache})  # fmt: skip

    def _stop_criteria(self, stop_strings: tuple[str, ...]):
        """Hugging Face's stop-string check for these strings (built once: it precomputes over the vocabulary)."""
        if not stop_strings:
            return None
        if stop_strings not in self._stop_checks:
            from transformers.generation.stopping_criteria import StopStringCriteria

            self._stop_checks[stop_strings] = StopStringCriteria(self.tokenizer, list(stop_strings))
        return self._stop_checks[stop_strings]

    def _cache_kwarg(self) -> str:
        # transformers renamed `past_key_values` to `cache` (the old name warns and will go away).
        from spo_cli.lora import plain_model

        # A LoRA policy's PEFT wrapper takes **kwargs: the transformers model inside names the argument.
        params = inspect.signature(plain_model(self.model).forward).parameters
        return "cache" if "cache" in params else "past_key_values"
