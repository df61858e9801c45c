"""Building and loading the policy: a tiny local model, or a Hugging Face checkpoint (local or hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from spo_cli.errors import SpoUserError
from spo_cli.recipe import PretrainedModel, TinyModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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
    (docs/software_stack.md#tokenizer-reload-in-transformers-5).
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
    if spec.gguf_file is not None:
        return _load_gguf_model(spec)
    if _is_local(name):
        check_model_dir(Path(name).expanduser(), field, spec.trust_remote_code)
    offline = not _is_local(name) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if offline:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or name, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=getattr(torch, spec.dtype),
            attn_implementation=spec.attn_implementation,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    except _load_errors() as exc:
        if offline and isinstance(exc, OSError):
            raise SpoUserError(_offline_hint(name, field)) from None
        hint = ""
        if "trust_remote_code" in str(exc) and not spec.trust_remote_code:
            hint = " (the model ships its own code, which runs only with `model.trust_remote_code: true`)"
        raise SpoUserError(f"`{field}`: cannot load {name!r}{hint}: {_one_line(exc)}") from None
    if _is_local(name):  # a hub model is downloaded whole (its files are checked against their hashes)
        _refuse_missing_weights(loading, Path(name).expanduser(), f"`{field}`: ")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_gguf_model(spec: PretrainedModel) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The recipe's GGUF file (downloaded first when name_or_path is a hub repository) as a plain HF model."""
    import torch

    from spo_cli.gguf_model import load_gguf

    field = "model.gguf_file"
    name = spec.name_or_path
    if _is_local(name):
        path = Path(name).expanduser() / spec.gguf_file
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, spec.gguf_file, revision=spec.revision))
        except Exception as exc:  # noqa: BLE001 - the hub client's errors have no common base but Exception
            raise SpoUserError(f"`{field}`: cannot download {spec.gguf_file!r} from {name!r}: {_one_line(exc)}") from None
    model, tokenizer = load_gguf(path, field, getattr(torch, spec.dtype))
    if spec.tokenizer is not None:
        tokenizer = load_tokenizer(spec.tokenizer)
    return model, tokenizer


def load_backbone(name_or_path: str, field: str, dtype) -> PreTrainedModel:
    """The transformer of a causal LM without its LM head (`AutoModel`), e.g. to start a critic from."""
    from transformers import AutoModel

    from spo_cli.tasks.data import hub_reachable

    name = name_or_path
    if _is_local(name):
        check_model_dir(Path(name).expanduser(), field)
    offline = not _is_local(name) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    try:
        return AutoModel.from_pretrained(name, dtype=dtype, local_files_only=offline, use_safetensors=True)
    except _load_errors() as exc:
        if offline and isinstance(exc, OSError):
            raise SpoUserError(_offline_hint(name, field)) from None
        raise SpoUserError(f"`{field}`: cannot load {name!r} as a transformer backbone: {_one_line(exc)}") from None


def load_checkpoint(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model + tokenizer that spo saved (Hugging Face format, safetensors weights).

    Only safetensors weights are read (spo writes no others): a pickled `pytorch_model.bin` is never unpickled.
    A damaged directory (a garbled config.json, a truncated or missing weights file) raises SpoUserError naming it.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = check_model_dir(path)
    tokenizer = load_tokenizer(path)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            path, config=config, local_files_only=True, dtype="auto", use_safetensors=True, output_loading_info=True
        )
    except _load_errors() as exc:
        raise SpoUserError(f"{path}: not a model directory spo wrote: {_one_line(exc)}") from None
    _refuse_missing_weights(loading, path)
    return model, tokenizer


def _refuse_missing_weights(loading: dict, path: Path, prefix: str = "") -> None:
    """Refuse a model whose weights files lack some of its tensors: transformers starts those from random values, with
    only a log line, so a damaged checkpoint would be trained or evaluated as if it were whole. Weights tied to others
    (an LM head sharing the embedding) are not saved and not missing."""
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        index = path / "model.safetensors.index.json"
        where = index if index.is_file() else path / "model.safetensors"
        names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SpoUserError(
            f"{prefix}{where}: lacks {names} (it would start from random values): the weights are incomplete; "
            + _SAVE_AGAIN
        )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; SpoUserError naming the directory when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except _load_errors() as exc:
        raise SpoUserError(f"{path}: cannot load its tokenizer: {_one_line(exc)}") from None


# How to turn a directory of pickled weights into safetensors: transformers unpickles them (with torch's
# weights_only loader) once, in a command the user chose to run on a file they trust.
_CONVERT = (
    "python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained({path!r}).save_pretrained({path!r})\""
)
_SAVE_AGAIN = "copy it again, or save the model again"
_MAX_HEADER = 100_000_000  # bytes; what the safetensors library itself accepts


def check_model_dir(path: Path, field: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a local model directory, refusing one that transformers would fail on with a traceback, or load
    by unpickling: config.json must be a valid model config and safetensors weights must be there, whole (a directory
    with only pickled weights, pytorch_model.bin, is refused with how to convert it).

    Cheap: it reads config.json and each weights file's header. `field`: the recipe field that named the directory.
    """
    prefix = f"`{field}`: " if field else ""
    if not path.is_dir():
        raise SpoUserError(f"{prefix}no such model directory: {path}")
    config = _read_config(path, prefix, trust_remote_code)
    _check_sizes(config, path / "config.json", prefix)
    weights = _safetensors_files(path, prefix)
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise SpoUserError(
                f"{prefix}{path}: holds only pickled PyTorch weights ({', '.join(pickled)}) and spo loads only "
                "safetensors weights (unpickling a file can run code); if you trust the file, convert it once with "
                + _CONVERT.format(path=str(path))
            )
        raise SpoUserError(f"{prefix}{path}: no weights: a model directory holds model.safetensors beside config.json")
    shapes = {name: (file, shape) for file in weights for name, shape in _check_safetensors(file, prefix).items()}
    _check_shapes(config, path / "config.json", shapes, prefix, trust_remote_code)
    return config


# A config's sizes above these describe no model (the largest released: hidden 16384-25600, a 262k vocabulary, 126
# layers): a damaged or hostile config, which transformers would allocate for ("Storage size calculation overflowed",
# or all the memory there is) before finding that the weights do not fit it.
CONFIG_SIZE_LIMITS = {
    "vocab_size": 2**22,
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 2**14,
}


def _check_sizes(config: PretrainedConfig, file: Path, prefix: str) -> None:
    """Refuse a size in `config` that no model has (see CONFIG_SIZE_LIMITS), naming the field."""
    for name, limit in CONFIG_SIZE_LIMITS.items():
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue  # unset, or an architecture without it (transformers checks its own types)
        if not 1 <= value <= limit:
            bound = f"above {limit}: no model is that big" if value > limit else "not a positive size"
            raise SpoUserError(f"{prefix}{file}: {name} is {value}, {bound}; is the file damaged?")


def _check_shapes(
    config: PretrainedConfig,
    file: Path,
    shapes: dict[str, tuple[Path, list[int]]],
    prefix: str,
    trust_remote_code: bool,
) -> None:
    """Refuse a config that gives a tensor another shape than the weights files hold (e.g. an edited config.json):
    transformers would build the whole model at the config's sizes before failing. The model is built on the meta
    device, which allocates nothing; tensors named differently in the files (renamed on load) are not compared."""
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None) is not None:
        return  # quantized weights are packed: their shapes differ from the model's by design
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (RuntimeError, OverflowError) as exc:  # sizes that no tensor can have
        raise SpoUserError(f"{prefix}{file}: cannot build the model it describes: {_one_line(exc)}") from None
    except Exception:  # noqa: BLE001 - not a causal LM (e.g. a critic's backbone): loading it says what is wrong
        return
    for name, tensor in model.state_dict().items():
        if name in shapes and list(tensor.shape) != shapes[name][1]:
            weights, shape = shapes[name]
            raise SpoUserError(
                f"{prefix}{file}: gives {name} the shape {list(tensor.shape)}, but {weights.name} holds {shape}: "
                "this config is not the weights' (edited, or copied from another model)"
            )


def _read_config(path: Path, prefix: str, trust_remote_code: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    file = path / "config.json"
    if not file.is_file():
        raise SpoUserError(f"{prefix}{path}: not a model directory (no config.json)")
    try:
        loaded = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpoUserError(f"{prefix}{file}: not valid JSON ({exc})") from None
    if not isinstance(loaded, dict) or "model_type" not in loaded:
        what = "no `model_type`" if isinstance(loaded, dict) else f"a JSON {type(loaded).__name__}, not an object"
        raise SpoUserError(f"{prefix}{file}: not a model config ({what})")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except _load_errors() as exc:
        hint = ""
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            hint = " (the model ships its own code, which runs only with `model.trust_remote_code: true`)"
        raise SpoUserError(f"{prefix}{file}: not a valid model config{hint}: {_one_line(exc)}") from None


def _safetensors_files(path: Path, prefix: str) -> list[Path]:
    """The weights files of a model directory: the shards its index lists, else its *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise SpoUserError(f"{prefix}{index}: not a safetensors index (JSON with a `weight_map`)") from None
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        raise SpoUserError(f"{prefix}{index}: lists weights files that are missing: {', '.join(missing)}")
    return [path / name for name in shards]


def _check_safetensors(file: Path, prefix: str = "") -> dict[str, list[int]]:
    """The shape of every tensor of a safetensors file, read from its header (8 bytes of length, then JSON with each
    tensor's shape and byte range); a truncated or garbled file is refused before transformers fails on it with a
    traceback."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or 8 + length > size:
            raise SpoUserError(
                f"{prefix}{file}: truncated, or not a safetensors file ({size} bytes, shorter than its header): "
                + _SAVE_AGAIN
            )
        try:
            if length > _MAX_HEADER:
                raise ValueError("header too long")
            header = json.loads(fh.read(length))
            tensors = {k: t for k, t in header.items() if k != "__metadata__"}
            end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
            shapes = {k: [int(n) for n in t["shape"]] for k, t in tensors.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise SpoUserError(f"{prefix}{file}: not a safetensors file (no valid header): {_SAVE_AGAIN}") from None
    described = 8 + length + end
    if described > size:
        raise SpoUserError(
            f"{prefix}{file}: truncated ({size} of the {described} bytes its header describes): {_SAVE_AGAIN}"
        )
    return shapes


def _load_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a model directory it cannot read (a bad config value, garbled weights)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return OSError, ValueError, TypeError, KeyError, StrictDataclassError, SafetensorError


def _one_line(exc: Exception, limit: int = 400) -> str:
    """An exception's message on one line, cut short (transformers' can list every model type it knows)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def import_gguf(path: Path, out: Path, dtype) -> None:
    """Write the GGUF file at `path` as a Hugging Face model directory `out` (config, safetensors, tokenizer),
    atomically: a crash leaves no half-written `out`."""
    from spo_cli.fsutil import publish_dir
    from spo_cli.gguf_model import load_gguf

    model, tokenizer = load_gguf(path, "FILE", dtype)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, tokenizer, staging)
    publish_dir(staging, out)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """An ordinary Hugging Face directory of the policy; a LoRA policy's adapters are merged into its weights."""
    from spo_cli.lora import is_peft_model, merged_state_dict

    if is_peft_model(model):
        model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(model), safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
