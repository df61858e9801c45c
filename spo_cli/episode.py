"""The one record that crosses every stage boundary, and its JSONL form.

| stage     | reads                         | writes                                   |
|-----------|-------------------------------|------------------------------------------|
| sample    | prompts                       | Episode with reward, segments=None       |
| partition | response_logprobs (entropies) | segments (advantage None)                |
| estimate  | segments, reward, group_id    | segment advantages, token_advantages     |
| optimize  | token ids, segments           | (a checkpoint and metrics)               |

SPO-tree's sampling writes one episode per tree node (prompt = the parent's text, response = the node's
segment, `metadata["tree"]` its place in the tree); its estimate stage keeps the edges to train on.

Token indices in `segments` are response-token indices, half-open, and together cover the response.

Every number of an episode is finite. JSON has no NaN or infinity, yet Python's json module reads the bare
tokens `NaN` and `Infinity` (and 1e999 as inf), and pydantic writes them back as null, which in a list of
log-probs or advantages no stage can read. So reading refuses them, naming file, line and field, and writing
refuses to emit them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spo_cli.errors import SpoUserError
from spo_cli.fsutil import atomic_open

SCHEMA_VERSION = 5
# Version 1 records lack response_entropies, token_advantages and Segment.is_boundary; version 2 records
# lack response_values and value_targets; version 3 records lack first_error; version 4 records lack tool_spans. Their defaults read them correctly,
# so older files are accepted.
READABLE_VERSIONS = (1, 2, 3, 4, 5)

# float32 log-softmax of a near-certain token can round a few ulps above 0 (a logit of magnitude ~100 has an ulp
# of ~1e-5); anything above this is a probability above 1, not a rounding error.
LOGPROB_TOLERANCE = 1e-4
# `metadata` is free-form JSON; spo's own (an SPO-tree node's place) nests 2 levels.
MAX_METADATA_DEPTH = 100


def _log_probabilities(values: list[float] | None) -> list[float] | None:
    # One max() over the list (C speed), not a validator call per token: episodes are built for every sample.
    if values and max(values) > LOGPROB_TOLERANCE:
        k = next(k for k, v in enumerate(values) if v > LOGPROB_TOLERANCE)
        raise ValueError(f"item {k} is {values[k]:g}, above 0: not a log-probability (it would be a probability above 1)")
    return values


# Ids index the model's embedding: a negative one is no token of any model (and an index error inside it).
TokenId = Annotated[int, Field(ge=0)]
# allow_inf_nan=False: every float field (and list item) must be finite; see the module docstring.
_RECORD_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class Segment(BaseModel):
    model_config = _RECORD_CONFIG

    start: int = Field(ge=0, description="First response-token index of the segment (inclusive).")
    end: int = Field(ge=0, description="End response-token index (exclusive).")
    advantage: float | None = Field(None, description="Advantage of the segment; None until estimated.")
    value: float | None = Field(
        None, description="Estimated value of the state before the segment's first token, where the estimator has one."
    )
    is_boundary: bool = Field(
        True,
        description="The segment opens at a partition boundary, so its start state gets a value estimate. False only "
        "for SPO-chain's leading region before the first cutpoint, whose advantage is 0.",
    )


class Episode(BaseModel):
    """One sampled response to one prompt."""

    model_config = _RECORD_CONFIG

    schema_version: Literal[1, 2, 3, 4, 5] = SCHEMA_VERSION
    id: str = Field(description="Unique id of the episode within a run.")
    group_id: str = Field(description="Id of the prompt; episodes of the same prompt form a group.")
    iteration: int = Field(0, ge=0, description="RL iteration that sampled it (the policy version).")
    prompt: str = Field(description="Prompt text as given to the model (after any chat template).")
    response: str = Field(description="Response text (special tokens and stop string removed).")
    gold: str | None = Field(None, description="Reference answer the reward was computed against.")
    prompt_token_ids: list[TokenId]
    response_token_ids: list[TokenId]
    response_logprobs: Annotated[list[float] | None, AfterValidator(_log_probabilities)] = Field(
        None,
        description="log pi(y_t | x, y_<t) of each response token under the sampling policy at the sampling temperature "
        "(full softmax, no top-p truncation). Null in files from elsewhere: `spo partition` then scores them."
    )
    response_entropies: list[float] | None = Field(
        None, description="Entropy (nats) of the sampling distribution at each response token, at the sampling temperature."
    )
    finish_reason: Literal["stop", "length"]
    tool_spans: list[tuple[int, int]] = Field(
        default_factory=list,
        description="[start, end) ranges of response tokens a tool wrote (a sandbox's output in a tool loop): not the "
        "policy's, so never trained, never a cutpoint or segment start, and left out of entropy and KL metrics; their "
        "log-probabilities and entropies are 0 placeholders.",
    )
    reward: float | None = None
    first_error: int | None = Field(
        None,
        ge=0,
        description="Index of the first response token that departs from a correct solution, for a wrong response "
        "on a task that can tell (arith); null for a right response, or where the task cannot tell. What the credit "
        "metrics compare advantages with.",
    )
    segments: list[Segment] | None = Field(None, description="Null until partitioned.")
    token_advantages: list[float] | None = Field(
        None,
        description="Advantage of each response token, where it is not simply its segment's advantage (SPO-chain zeroes "
        "tokens with probability above rho). Null: every token takes its segment's advantage.",
    )
    response_values: list[float] | None = Field(
        None,
        description="The critic's value of the state before each response token when advantages were estimated "
        "(V_old of the clipped value loss). Null without a critic.",
    )
    value_targets: list[float | None] | None = Field(
        None,
        description="Return the critic regresses to at each response token (GAE advantage + V_old); null entries are "
        "tokens where the critic is not trained. Null without a critic.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Extras for later stages, e.g. `tree` (node, parent, depth, leaf, question, value) on SPO-tree edges.",
    )

    @field_validator("metadata")
    @classmethod
    def _finite_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        # Free-form, so neither the field types nor allow_inf_nan reach it. Bounded first: the number check below
        # and the writers recurse per level, and would end in a RecursionError.
        if nesting_exceeds(metadata, MAX_METADATA_DEPTH):
            raise ValueError(f"nested more than {MAX_METADATA_DEPTH} levels deep (spo's own metadata has a few)")
        # A later stage reads numbers from it (tree values).
        found = non_finite_number(metadata)
        if found is not None:
            raise ValueError(f"{found[0]} is {found[1]}, not a finite number")
        return metadata

    @model_validator(mode="after")
    def _aligned(self) -> Episode:
        n = len(self.response_token_ids)
        for name in ("response_logprobs", "response_entropies", "token_advantages", "response_values", "value_targets"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} response tokens")
        if self.segments is not None:
            check_segments_cover(self.segments, n)
        previous = 0
        for start, end in self.tool_spans:
            if not previous <= start < end <= n:
                raise ValueError(f"tool_spans must be ordered, non-empty ranges within the {n} response tokens")
            previous = end
        if self.first_error is not None and self.first_error >= n:
            raise ValueError(f"first_error is token {self.first_error} of a response of {n} tokens")
        return self


def policy_token_mask(episode: Episode) -> list[float]:
    """1.0 for each response token the policy sampled, 0.0 for each a tool wrote (`tool_spans`)."""
    mask = [1.0] * len(episode.response_token_ids)
    for start, end in episode.tool_spans:
        mask[start:end] = [0.0] * (end - start)
    return mask


def check_segments_cover(segments: Sequence[Segment], length: int) -> None:
    """Raise ValueError unless the segments are contiguous, non-empty and cover [0, length)."""
    pos = 0
    for seg in segments:
        if seg.start != pos or seg.end <= seg.start:
            raise ValueError(f"segments must be contiguous and non-empty, covering [0, {length}); got {segments}")
        pos = seg.end
    if pos != length and not (length == 0 and not segments):
        raise ValueError(f"segments cover [0, {pos}) but the response has {length} tokens")


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether dicts and lists in `value` nest deeper than `limit` levels (`value` itself is level 1); iterative, so
    any depth is measured without recursion."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        level = [
            child for node in level for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]  # fmt: skip
        if not level:
            return False
    return True


def non_finite_number(value: Any, where: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinite float in nested dicts and lists, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        if _finite_numbers(value):  # the common case, at C speed: episodes carry lists of thousands of floats
            return None
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_number(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _finite_numbers(values: list | tuple) -> bool:
    """Whether `values` are all finite numbers or None; False also when it cannot tell (then look one by one).

    A NaN or infinity makes the sum non-finite, so a finite sum clears them all; a sum that overflows clears none.
    """
    try:
        return math.isfinite(sum(v for v in values if v is not None))
    except (TypeError, OverflowError):  # not numbers (dicts, strings), or an int beyond any float
        return False


def model_fit_problem(episode: Episode, vocab_size: int, max_context: int | None) -> str | None:
    """Why a model that embeds `vocab_size` token ids and has `max_context` positions cannot run on `episode`
    (as "field: reason"), else None.

    Checked before a forward pass: the model's own failure on such input is an index error deep inside the
    embedding (on a GPU a device-side assert), and positions past the context give garbage without any error.
    """
    for name in ("prompt_token_ids", "response_token_ids"):
        ids = getattr(episode, name)
        if ids and max(ids) >= vocab_size:
            k = next(k for k, t in enumerate(ids) if t >= vocab_size)
            return (
                f"{name}.{k}: token id {ids[k]} is outside the model's vocabulary ({vocab_size} ids); "
                "were the episodes sampled by another model?"
            )
    prompt, response = len(episode.prompt_token_ids), len(episode.response_token_ids)
    if max_context is not None and prompt + response > max_context:
        return (
            f"response_token_ids: {prompt} prompt + {response} response tokens = {prompt + response}, more than the "
            f"model's context of {max_context} tokens (max_position_embeddings)"
        )
    if not prompt:
        return "prompt_token_ids: empty; the model scores each response token from the tokens before it"
    return None


def token_advantages(episode: Episode) -> list[float]:
    """Per-response-token advantages: the episode's own list, else each token gets its segment's advantage."""
    if episode.token_advantages is not None:
        return list(episode.token_advantages)
    if episode.segments is None:
        raise ValueError(f"episode {episode.id} has no segments: run the partition stage first")
    out = [0.0] * len(episode.response_token_ids)
    for seg in episode.segments:
        if seg.advantage is None:
            raise ValueError(f"episode {episode.id} has a segment without an advantage: run the estimate stage first")
        out[seg.start : seg.end] = [seg.advantage] * (seg.end - seg.start)
    return out


# ----------------------------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a missing file or bad JSON raises SpoUserError."""
    path = Path(path)
    if not path.is_file():
        raise SpoUserError(f"{what} not found: {path}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SpoUserError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpoUserError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:  # the json module recurses per level of nesting
                raise SpoUserError(
                    f"{path}:{lineno}: not valid JSON: nested more than the parser's ~{sys.getrecursionlimit()} levels"
                ) from None
            yield lineno, value


def iter_numbered_episodes(path: str | Path) -> Iterator[tuple[int, Episode]]:
    """(line number, episode) of a JSONL file; a malformed line raises SpoUserError naming file, line and field."""
    for lineno, raw in iter_jsonl(path, "episode file"):
        if isinstance(raw, dict) and raw.get("schema_version", SCHEMA_VERSION) not in READABLE_VERSIONS:
            raise SpoUserError(
                f"{path}:{lineno}: episode schema_version {raw.get('schema_version')!r}; "
                f"this spo reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            episode = Episode.model_validate(raw)
        except ValidationError as exc:
            raise SpoUserError(f"{path}:{lineno}: bad episode: {_describe(exc.errors()[0])}") from None
        yield lineno, episode


def _describe(err: dict[str, Any]) -> str:
    """The "field: problem" text of one pydantic error."""
    field = ".".join(str(p) for p in err["loc"]) or "(record)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("finite_number", "greater_than_equal"):  # a number: show it (other inputs can be large)
        msg += f", not {err['input']}"
    return f"{field}: {msg}"


def iter_episodes(path: str | Path) -> Iterator[Episode]:
    """Read episodes from a JSONL file; a malformed line raises SpoUserError naming file and line."""
    for _, episode in iter_numbered_episodes(path):
        yield episode


def read_numbered_episodes(path: str | Path) -> list[tuple[int, Episode]]:
    """(line number, episode) of every episode of a JSONL file; an empty file is an error (a stage given nothing
    to work on was given the wrong file)."""
    numbered = list(iter_numbered_episodes(path))
    if not numbered:
        raise SpoUserError(f"{path}: no episodes (the file is empty)")
    return numbered


def read_episodes(path: str | Path) -> list[Episode]:
    """All episodes of a JSONL file; an empty file is an error."""
    return [episode for _, episode in read_numbered_episodes(path)]


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> None:
    """Write episodes as JSONL atomically (a crash leaves either the old file or the new one).

    A NaN or infinite number raises ValueError and leaves the old file (or none): pydantic would write it as null,
    which no stage reads back. Input files are checked when read, so such a number comes from the stage that
    computed it: a bug to report, not output to pass on.
    """
    with atomic_open(path) as fh:
        for ep in episodes:
            found = non_finite_number(ep.model_dump())
            if found is not None:
                raise ValueError(f"episode {ep.id}: {found[0]} is {found[1]}, not a finite number: {path} not written")
            # Records are written in the current schema, whatever version they were read in.
            fh.write(ep.model_copy(update={"schema_version": SCHEMA_VERSION}).model_dump_json())
            fh.write("\n")
