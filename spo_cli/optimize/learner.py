"""Who applies the optimizer step: plain PyTorch in one process, or Accelerate (DDP or DeepSpeed ZeRO) across many.

`ppo_update` sees only a learner: the module to run training forward passes through, a context per micro-batch
(whose gradients are synchronised only on the last one), `backward` and `step`. The inference module is what
sampling and scoring run: the same module as training's, except under ZeRO-3, whose parameters are partitioned
between processes; there every process keeps a full copy, refreshed after each optimizer phase.

Checkpoints: the main process writes `optimizer.pt` (optimizer unless DeepSpeed owns it, scheduler, RNG) and the
model; under DeepSpeed every process also writes its optimizer shard to `deepspeed/` (DeepSpeed's own format),
which only a run with the same number of processes can load.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from spo_cli.distributed import LOCAL, Cluster, current_cluster
from spo_cli.errors import SpoUserError
from spo_cli.recipe import DeepSpeed, Hardware

OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
_DEEPSPEED_TAG = "zero"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_optimizer_file(directory: Path, optimizer, scheduler) -> None:
    """`optimizer.pt`: the optimizer's state (None: DeepSpeed keeps it in its own shards), the schedule and RNG."""
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, directory / OPTIMIZER_FILE)


def read_optimizer_file(directory: Path, optimizer, scheduler) -> None:
    """Restore what `write_optimizer_file` wrote into `optimizer` (unless None), `scheduler` and the RNG."""
    path = directory / OPTIMIZER_FILE
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SpoUserError(
            f"{path}: holds objects other than tensors and plain containers, which spo does not unpickle "
            f"(it never writes them): {str(exc).splitlines()[0]}"
        ) from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


class LocalLearner:
    """One process, plain PyTorch: backward accumulates, step clips, steps the optimizer and the schedule."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float):
        self.model = model
        self.inference_model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.cluster = LOCAL

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def refresh_inference_model(self) -> None:
        """Nothing to do: inference runs the trained module itself."""

    def save_state(self, directory: Path) -> None:
        write_optimizer_file(directory, self.optimizer, self.scheduler)

    def load_state(self, directory: Path) -> None:
        read_optimizer_file(directory, self.optimizer, self.scheduler)


class AccelerateLearner:
    """Several processes through Accelerate: DDP (gradients all-reduced on the last micro-batch) or a DeepSpeed
    engine (ZeRO stage 0-3; its gradient accumulation boundary is set per micro-batch, its loss never rescaled).

    Gradients are averaged over processes by both, so `ppo_update` scales each process's share of the loss by the
    number of processes: the step then equals one process's step over the whole mini-batch.
    """

    def __init__(
        self, accelerator, model, optimizer, scheduler, max_grad_norm: float, cluster: Cluster, zero_stage, replica=None
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.cluster = cluster
        self.zero_stage = zero_stage  # None: DDP
        # ZeRO-3 partitions the trained module's parameters: inference runs a full copy of its own (`replica`).
        self.inference_model = replica if replica is not None else accelerator.unwrap_model(model)

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
            return contextlib.nullcontext()
        # DDP decides at forward time whether the following backward all-reduces.
        return contextlib.nullcontext() if last else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.model.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def step(self) -> float:
        if self.deepspeed:
            # Clips to gradient_clipping, steps the optimizer and zeroes the gradients.
            self.model.step()
            grad_norm = self.model.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def refresh_inference_model(self) -> None:
        """Under ZeRO-3, gather the new weights into every process's full copy (a collective: all processes call it
        at the same point of the loop)."""
        if self.zero_stage != 3:
            return
        import deepspeed

        target = dict(self.inference_model.named_parameters())
        with torch.no_grad():
            for name, param in self.accelerator.unwrap_model(self.model).named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    target[name].copy_(param.data)

    def save_state(self, directory: Path) -> None:
        """Every process calls this with the same (unpublished) checkpoint directory."""
        if self.deepspeed:
            self.model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, save_latest=False)
        if self.cluster.is_main:
            write_optimizer_file(directory, None if self.deepspeed else self.optimizer, self.scheduler)

    def load_state(self, directory: Path) -> None:
        if self.deepspeed:
            if not (directory / DEEPSPEED_DIR).is_dir():
                raise SpoUserError(f"--resume: {directory} has no {DEEPSPEED_DIR}/: it was not written under DeepSpeed")
            path, _ = self.model.load_checkpoint(
                str(directory / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )  # fmt: skip
            if path is None:
                raise SpoUserError(f"--resume: DeepSpeed could not load {directory / DEEPSPEED_DIR}")
            self.refresh_inference_model()
        read_optimizer_file(directory, None if self.deepspeed else self.optimizer, self.scheduler)


# ------------------------------------------------------------------------------------------------ set-up


def deepspeed_base_config(spec: DeepSpeed | str | None, env: dict[str, str]) -> dict[str, Any] | None:
    """The DeepSpeed config a run asks for, before the recipe fills its batch, clipping and precision entries.

    From the recipe's `hardware.deepspeed` (settings or a JSON file), else from the environment that `accelerate
    launch --config_file <a DeepSpeed config>` sets; None when DeepSpeed is not used.
    """
    if isinstance(spec, DeepSpeed):
        zero: dict[str, Any] = {"stage": spec.zero_stage}
        if spec.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if spec.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        return {"zero_optimization": zero}
    if isinstance(spec, str):
        return read_deepspeed_file(spec, "hardware.deepspeed")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("", "none", "None"):
        return read_deepspeed_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], "the accelerate config's deepspeed_config_file")
    zero = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for kind in ("optimizer", "param"):
        device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
        if device not in ("", "none"):
            zero[f"offload_{kind}"] = {"device": device}
    return {"zero_optimization": zero}


def read_deepspeed_file(path: str, field: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpoUserError(f"`{field}`: cannot read {path}: {exc.strerror}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpoUserError(f"`{field}`: {path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(config, dict):
        raise SpoUserError(f"`{field}`: {path}: a DeepSpeed config must be a JSON object")
    return config


def fill_deepspeed_config(
    base: dict[str, Any], *, micro_batch: int, accumulation: int, world_size: int, max_grad_norm: float, bf16: bool
) -> dict[str, Any]:
    """`base` with its batch, clipping and precision entries set from the recipe where missing or "auto".

    The recipe's values win over the file's only where the file says "auto" (or nothing): a number in the file
    that disagrees with the recipe is an error, since the loop, not DeepSpeed, decides the batch.
    """
    config = copy.deepcopy(base)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif current != value:
            raise SpoUserError(
                f"the DeepSpeed config sets {key}={current!r} but the recipe implies {value!r} "
                "(train.per_device_train_batch_size, train.gradient_accumulation_steps, optim.max_grad_norm): set "
                'it to "auto"'
            )
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    config.setdefault("zero_optimization", {}).setdefault("stage", 0)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 1 << 62)
    return config


def start_processes(hardware: Hardware, runtime) -> tuple[Any, Cluster, dict[str, Any] | None]:
    """The Accelerator of a distributed run (it initialises torch.distributed), this process's cluster view and the
    DeepSpeed config the run asked for (None without DeepSpeed); or (None, LOCAL, None) for a single plain process.

    A run is distributed when the launcher started several processes (WORLD_SIZE > 1) or the recipe or the
    accelerate config asks for DeepSpeed; a one-process DeepSpeed run gets a one-process group here.
    """
    env = os.environ
    base = deepspeed_base_config(hardware.deepspeed, dict(env))
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 and base is None:
        if (hardware.num_processes or 1) > 1 and hardware.launcher == "none":
            raise SpoUserError(
                f"hardware.num_processes is {hardware.num_processes} with launcher none, but no launcher started this "
                "process (WORLD_SIZE is not set): start it with torchrun/srun, or set hardware.launcher"
            )
        return None, LOCAL, None
    if world <= 1:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            env.setdefault(key, value)
        env.setdefault("MASTER_PORT", str(hardware.main_process_port))
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    # The main process runs the supervised warm start alone while the others wait in a barrier: allow it hours,
    # not the default minutes. A process that dies still ends the run at once (the launcher stops the others).
    group = InitProcessGroupKwargs(timeout=timedelta(hours=3))
    kwargs: dict[str, Any] = {"kwargs_handlers": [group]}
    if runtime.device == "cpu":
        # accelerate only picks gloo on a GPU-less machine when told
        # (docs/software_stack.md#accelerate-on-a-machine-without-a-gpu).
        group.backend = "gloo"
        if base is None:
            kwargs["cpu"] = True
    if base is not None:
        # The launch config's DeepSpeed fields are already in `base`; left in the environment, accelerate would
        # refuse our complete config for shadowing them.
        env.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        # No zero3_init: every process builds and loads whole models on its own (the SFT warm start runs on the
        # main process only, a reference model is a plain copy); DeepSpeed partitions the policy when prepared.
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(base), zero3_init_flag=False)
    accelerator = Accelerator(**kwargs)
    if base is not None:
        from transformers.integrations import unset_hf_deepspeed_config

        # Accelerate tells transformers that ZeRO-3 is on, which makes every model built afterwards (the warm start
        # on the main process alone, a checkpoint, a critic) partition itself collectively as it is created.
        unset_hf_deepspeed_config()
    return accelerator, current_cluster(), base


def build_learner(accelerator, cluster: Cluster, model, optimizer, schedule, *, deepspeed_config: dict[str, Any] | None,
                  max_grad_norm: float, micro_batch: int, accumulation: int) -> LocalLearner | AccelerateLearner:  # fmt: skip
    """The learner over `model` and `optimizer`; `schedule(optimizer)` builds the learning-rate scheduler on the
    optimizer that really steps (DeepSpeed may replace the one given, e.g. by its CPU Adam when offloading).
    `deepspeed_config` is `start_processes`'s: the config as the run asked for it, before accelerate's plugin added
    its own defaults."""
    if accelerator is None:
        return LocalLearner(model, optimizer, schedule(optimizer), max_grad_norm)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        prepared = accelerator.prepare_model(model)
        return AccelerateLearner(accelerator, prepared, optimizer, schedule(optimizer), max_grad_norm, cluster, None)
    dtype = next(model.parameters()).dtype
    filled = fill_deepspeed_config(
        deepspeed_config, micro_batch=micro_batch, accumulation=accumulation,
        world_size=cluster.world_size, max_grad_norm=max_grad_norm, bf16=dtype == torch.bfloat16,
    )  # fmt: skip
    plugin.deepspeed_config.clear()
    plugin.deepspeed_config.update(filled)
    stage = int(plugin.deepspeed_config["zero_optimization"].get("stage", 0))
    if stage == 3 and hasattr(model, "peft_config"):
        raise SpoUserError(
            "lora with DeepSpeed ZeRO-3 (set by hardware.deepspeed's file or the accelerate config) is not supported: "
            "ZeRO-3 partitions the frozen base weights, which the KL reference and merged checkpoints need whole; "
            "use ZeRO-2"
        )
    # Taken before DeepSpeed partitions the parameters, while they are still whole.
    replica = copy.deepcopy(model).eval().requires_grad_(False) if stage == 3 else None
    engine, wrapped = accelerator.prepare(model, optimizer)
    inner = _torch_optimizer(engine.optimizer)
    return AccelerateLearner(accelerator, engine, wrapped, schedule(inner), max_grad_norm, cluster, stage, replica)


def _torch_optimizer(optimizer):
    """The torch optimizer whose param groups' learning rates are used, under DeepSpeed's wrappers."""
    seen = optimizer
    while not isinstance(seen, torch.optim.Optimizer) and hasattr(seen, "optimizer"):
        seen = seen.optimizer
    if not isinstance(seen, torch.optim.Optimizer):
        raise AssertionError(f"no torch optimizer inside {type(optimizer).__name__}")
    return seen
