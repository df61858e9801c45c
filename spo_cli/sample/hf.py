"""Sampling with Hugging Face `generate` (KV cache, batched, seeded): the embedded default backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spo_cli.hardware import Runtime
from spo_cli.policy import score_responses
from spo_cli.sample import Completion, SamplingParams


class HFSampler:
    """Generates with the live policy module, so it always samples the current weights (no sync step)."""

    def __init__(self, model, tokenizer, runtime: Runtime, generation_batch_size: int = 256, score_batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.generation_batch_size = generation_batch_size
        self.score_batch_size = score_batch_size

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    def generate(self, prompts: Sequence[str], params: SamplingParams, seed: int) -> list[list[Completion]]:
        """`params.n` completions for each prompt, with log-probs at the sampling temperature."""
        if not prompts:
            return []
        prompt_ids = self.encode_prompts(prompts)
        per_call = max(1, self.generation_batch_size // params.n)
        raw: list[list[list[int]]] = []
        was_training = self.model.training
        self.model.eval()
        # fork_rng keeps sampling from touching the process-wide RNG: each call's randomness is a
        # function of `seed` alone, which makes resumed runs sample exactly what uninterrupted ones do.
        devices = [torch.cuda.current_device()] if self.runtime.device == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for start in range(0, len(prompt_ids), per_call):
                    raw.extend(self._generate_chunk(prompt_ids[start : start + per_call], params))
        finally:
            self.model.train(was_training)
        flat_prompts, flat_responses, meta = [], [], []
        for ids, outs in zip(prompt_ids, raw):
            for tokens in outs:
                response, text, reason = self._finish(tokens, params)
                flat_prompts.append(ids)
                flat_responses.append(response)
                meta.append((text, reason))
        if not params.logprobs:
            logprobs = [[] for _ in flat_responses]
        else:
            logprobs = score_responses(
                self.model,
                flat_prompts,
                flat_responses,
                pad_id=self.tokenizer.pad_token_id,
                temperature=params.temperature or 1.0,  # greedy: report untempered log-probs
                batch_size=self.score_batch_size,
                device=self.runtime.device,
                autocast=self.runtime.autocast,
            )
        completions = [
            Completion(prompt_token_ids=list(p), token_ids=r, text=t, finish_reason=f, logprobs=lp)
            for p, r, (t, f), lp in zip(flat_prompts, flat_responses, meta, logprobs)
        ]
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_chunk(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
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
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n_decode,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        with self.runtime.autocast():
            out = self.model.generate(
                input_ids=input_ids.to(self.runtime.device), attention_mask=attention.to(self.runtime.device), **kwargs
            )
        new = out[:, width:].tolist()
        if greedy:
            return [[list(row) for _ in range(params.n)] for row in new]
        return [new[i * params.n : (i + 1) * params.n] for i in range(len(prompt_ids))]

    def _finish(self, tokens: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Cut raw generated tokens at EOS or a stop string: (response ids, text, finish_reason)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        eos_at = tokens.index(eos) if eos in tokens else None
        body = tokens if eos_at is None else tokens[:eos_at]
        text = tok.decode(body, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            # Keep the longest token prefix whose text ends before the stop string (the token that
            # completes the stop string may carry a few characters of the answer; those are dropped).
            lo, hi = 0, len(body)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(tok.decode(body[:mid], skip_special_tokens=True)) <= cut:
                    lo = mid
                else:
                    hi = mid - 1
            body = body[:lo]
            return body, tok.decode(body, skip_special_tokens=True), "stop"
        if eos_at is not None:
            return (body + [eos] if params.keep_eos_token else body), text, "stop"
        return body, text, "length"
