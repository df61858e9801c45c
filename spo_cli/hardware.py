"""Device, precision and threads: resolved once from the recipe's `hardware` section."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Hardware


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 instructions (bf16 matmuls run natively)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda"
    bf16: bool

    def autocast(self):
        """bf16 autocast context for forward passes (a no-op in fp32)."""
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)


def resolve_runtime(spec: Hardware) -> Runtime:
    import torch

    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SpoUserError("`hardware.device` is cuda but no CUDA device is available; use auto or cpu")
    device = "cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu"
    native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_native_bf16()
    if spec.precision == "bf16" and not native:
        raise SpoUserError(f"`hardware.precision` is bf16 but this {device} has no native bf16; use auto or fp32")
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and native)
    return Runtime(device=device, bf16=bf16)
