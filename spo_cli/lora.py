"""LoRA adapters on the policy (the recipe's `lora` section), through PEFT.

RL then trains only the adapters. The base weights stay frozen in memory once: the KL reference is the same
module with its adapters disabled (`AdapterDisabledReference`, as TRL does), not a second copy. A checkpoint holds
the adapter (`adapter/`, PEFT's format, what `--resume` loads onto the warm start) and the merged weights (`model/`,
an ordinary Hugging Face directory, what `spo eval`, `spo report`, `--policy` and vLLM read). The merged weights are
computed into new tensors, never by merging in place and unmerging, which would round the live base weights and
break an exact resume.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spo_cli.errors import SpoUserError

if TYPE_CHECKING:
    from spo_cli.recipe import Lora

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"  # PEFT's name of the first adapter


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def plain_model(model):
    """The transformers model inside a PEFT model (with its adapter layers injected), else `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def _quiet_peft():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning that
    is PEFT's to fix, not the user's, printed at every run start otherwise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model, spec: Lora, seed: int):
    """`model` with fresh LoRA adapters (PEFT's initialisation: B = 0, so the policy is unchanged at first; A drawn
    from `seed` alone, so runs that reach this point by different paths, e.g. a warm start trained or loaded, start
    from the same adapter).

    Raises SpoUserError naming `lora.target_modules` when they match no layer of the model.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "target_modules" in str(exc):
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise SpoUserError(
                f"`lora.target_modules`: {spec.target_modules!r} matches no layer of the model; its linear layers "
                f"are named {', '.join(names)} (or use all-linear)"
            ) from None
        raise


def load_adapter(model, spec: Lora, directory: Path):
    """`model` with the adapter saved in `directory` (by `save_adapter`), trainable: how a LoRA run resumes."""
    from peft import PeftModel

    if not (directory / "adapter_config.json").is_file():
        raise SpoUserError(f"--resume: {directory.parent} has no {ADAPTER_DIR}/: it was not written by a LoRA run")
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, directory, is_trainable=True)
    saved = peft_model.peft_config[ADAPTER_NAME]
    if (saved.r, saved.lora_alpha) != (spec.r, spec.lora_alpha):
        raise SpoUserError(
            f"--resume: {directory} holds an adapter of r={saved.r}, lora_alpha={saved.lora_alpha}, not the recipe's "
            f"lora.r={spec.r}, lora.lora_alpha={spec.lora_alpha}"
        )
    return peft_model


def set_adapter_base(model, base: str) -> None:
    """Record in the adapter's config the model it was trained on (the warm start, when there is one, not the
    recipe's model): what `PeftModel.from_pretrained` users must load it onto."""
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base


def save_adapter(model, directory: Path) -> None:
    """The adapter weights and config (PEFT's format) into `directory`."""
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template: nothing about this run


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of the plain model that computes what `model` (a PEFT LoRA model) computes: every adapted
    layer's weight is W + scale * B @ A, in new tensors; the model itself is not touched. Keys are the plain
    model's (no `base_layer`, no adapter tensors)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                weight = module.get_base_layer().weight
                delta = module.get_delta_weight(ADAPTER_NAME)
                merged[f"{name}.weight"] = (weight + delta.to(weight.dtype)).detach()
    return merged


def policy_state_dict(model) -> dict[str, Any]:
    """The plain weights of the policy: merged for a LoRA model, else the module's own state dict."""
    return merged_state_dict(model) if is_peft_model(model) else model.state_dict()


class AdapterDisabledReference:
    """The KL reference of a LoRA run: the policy's own module with its adapters switched off for the call, so the
    frozen base weights are shared, not copied. Called like a model (`score_responses` runs it under no_grad)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def parameters(self):
        return self.peft_model.parameters()

    @property
    def config(self):
        """The model's config (`pack` reads its attention implementation)."""
        return self.peft_model.config

    def get_output_embeddings(self):
        """The LM head, which the adapters leave alone (`packed_logprobs` hooks it)."""
        return self.peft_model.get_output_embeddings()

    def eval(self) -> AdapterDisabledReference:
        return self


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
