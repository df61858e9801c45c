"""Building and loading the policy: a tiny local model, or a Hugging Face checkpoint (local or hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from spo_cli.errors import SpoUserError
from spo_cli.recipe import PretrainedModel, TinyModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# ChatML, the Qwen2 wire format, with add_generation_prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level BPE with the 256-byte alphabet, three ChatML specials and no merges.

    No merges means digits are single tokens (which a tiny model learns arithmetic on), and the
    tokenizer survives transformers 5's rebuild of Qwen2 tokenizers on reload unchanged
    (tiny_arith_feasibility.md section 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        model_max_length=4096,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny_model(spec: TinyModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[spec.arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed if spec.init_seed is not None else seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~"))


def _offline_hint(name: str, field: str) -> str:
    return (
        f"cannot load {name!r} (recipe field `{field}`): it is not a local directory and the Hugging Face Hub "
        "is not reachable (or HF_HUB_OFFLINE is set) and it is not in the local HF cache. Download it on a "
        "machine with internet (`huggingface-cli download NAME --local-dir DIR`) and set the field to DIR, "
        "or use `model.kind: tiny` for a locally built model."
    )


def load_pretrained(spec: PretrainedModel, field: str = "model.name_or_path") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; fail fast with a clear message when a hub name is unreachable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_cli.tasks.data import hub_reachable

    name = spec.name_or_path
    if _is_local(name) and not Path(name).expanduser().is_dir():
        raise SpoUserError(f"`{field}`: no such model directory: {name}")
    offline = not _is_local(name) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if offline:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=getattr(torch, spec.dtype),
            attn_implementation=spec.attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        if offline and isinstance(exc, OSError):
            raise SpoUserError(_offline_hint(name, field)) from None
        hint = ""
        if "trust_remote_code" in str(exc) and not spec.trust_remote_code:
            hint = " (the model ships its own code, which runs only with `model.trust_remote_code: true`)"
        raise SpoUserError(f"`{field}`: cannot load {name!r}{hint}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_backbone(name_or_path: str, field: str, dtype) -> PreTrainedModel:
    """The transformer of a causal LM without its LM head (`AutoModel`), e.g. to start a critic from."""
    from transformers import AutoModel

    from spo_cli.tasks.data import hub_reachable

    name = name_or_path
    if _is_local(name) and not Path(name).expanduser().is_dir():
        raise SpoUserError(f"`{field}`: no such model directory: {name}")
    offline = not _is_local(name) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    try:
        return AutoModel.from_pretrained(name, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise SpoUserError(_offline_hint(name, field)) from None
        raise SpoUserError(f"`{field}`: cannot load {name!r} as a transformer backbone: {exc}") from None


def load_checkpoint(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model + tokenizer that spo saved (Hugging Face format, safetensors weights).

    Only safetensors weights are read (spo writes no others): a pickled `pytorch_model.bin` is never unpickled.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise SpoUserError(f"{path}: not a model directory spo wrote: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
