"""A GGUF file (llama.cpp's format, how many small models are shipped) as an ordinary Hugging Face model.

transformers reads a GGUF with `from_pretrained(dir, gguf_file=name)`: it dequantizes every tensor (to float32 here)
and builds the tokenizer, chat template included, from the file's metadata. A model loaded that way refuses
`save_pretrained` ("quantized with gguf"), so spo copies its weights into a fresh model of the same config: the
copy trains, checkpoints and reloads like any other (docs/real_model.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spo_cli.errors import SpoUserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'spo[gguf]' (the `gguf` package transformers reads GGUF files with)"


def check_gguf_file(path: Path, field: str) -> None:
    """Refuse what is not a GGUF file (missing, a directory, other bytes) before transformers fails on it."""
    if not path.exists():
        raise SpoUserError(f"`{field}`: no such GGUF file: {path}")
    if not path.is_file():
        raise SpoUserError(f"`{field}`: {path} is a directory, not a GGUF file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise SpoUserError(f"`{field}`: {path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def gguf_architecture(path: Path, field: str) -> str:
    """The `general.architecture` a GGUF file declares (e.g. 'llama'), read from its header."""
    try:
        import gguf
    except ImportError:
        raise SpoUserError(f"`{field}`: reading a GGUF file needs the gguf package: {INSTALL_HINT}") from None
    try:
        reader = gguf.GGUFReader(str(path))
        value = reader.fields["general.architecture"]
        return bytes(value.parts[value.data[0]]).decode("utf-8")
    except (KeyError, IndexError, ValueError, UnicodeDecodeError, OSError) as exc:
        raise SpoUserError(f"`{field}`: {path}: not a readable GGUF file: {' '.join(str(exc).split())}") from None


def supported_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})  # metadata groups, not architectures


def load_gguf(path: Path, field: str, dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a GGUF file, the model as a plain (saveable) Hugging Face model in `dtype`.

    Raises SpoUserError naming `field` for a path that is not a GGUF file or an architecture transformers cannot
    read from GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(path, field)
    architecture = gguf_architecture(path, field)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        if "not supported" in str(exc):  # transformers' words for an architecture (or tokenizer) it has no mapping of
            raise SpoUserError(
                f"`{field}`: {path} holds a {architecture!r} model, which transformers cannot load from GGUF "
                f"({' '.join(str(exc).split())[:200]}); it reads GGUF files of: {', '.join(supported_architectures())}"
            ) from None
        raise SpoUserError(f"`{field}`: cannot load {path}: {' '.join(str(exc).split())[:400]}") from None
    model = _plain_copy(loaded, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _plain_copy(loaded: PreTrainedModel, dtype) -> PreTrainedModel:
    """A fresh model of `loaded`'s config holding its weights, without the GGUF marks that block saving."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:  # tied weights appear once in a state dict: only a real mismatch reaches here
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        real = [k for k in missing if k not in tied] + list(unexpected)
        if real:
            raise SpoUserError(f"the GGUF model's weights do not fit its own config: {', '.join(real[:5])}")
    model.generation_config = loaded.generation_config
    return model
