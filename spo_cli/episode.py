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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spo_cli.errors import SpoUserError
from spo_cli.fsutil import atomic_open

SCHEMA_VERSION = 3
# Version 1 records lack response_entropies, token_advantages and Segment.is_boundary; version 2 records
# lack response_values and value_targets. Their defaults read them correctly, so older files are accepted.
READABLE_VERSIONS = (1, 2, 3)


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    id: str = Field(description="Unique id of the episode within a run.")
    group_id: str = Field(description="Id of the prompt; episodes of the same prompt form a group.")
    iteration: int = Field(0, ge=0, description="RL iteration that sampled it (the policy version).")
    prompt: str = Field(description="Prompt text as given to the model (after any chat template).")
    response: str = Field(description="Response text (special tokens and stop string removed).")
    gold: str | None = Field(None, description="Reference answer the reward was computed against.")
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float] | None = Field(
        None,
        description="log pi(y_t | x, y_<t) of each response token under the sampling policy at the sampling temperature "
        "(full softmax, no top-p truncation). Null in files from elsewhere: `spo partition` then scores them."
    )
    response_entropies: list[float] | None = Field(
        None, description="Entropy (nats) of the sampling distribution at each response token, at the sampling temperature."
    )
    finish_reason: Literal["stop", "length"]
    reward: float | None = None
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

    @model_validator(mode="after")
    def _aligned(self) -> Episode:
        n = len(self.response_token_ids)
        for name in ("response_logprobs", "response_entropies", "token_advantages", "response_values", "value_targets"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} response tokens")
        if self.segments is not None:
            check_segments_cover(self.segments, n)
        return self


def check_segments_cover(segments: Sequence[Segment], length: int) -> None:
    """Raise ValueError unless the segments are contiguous, non-empty and cover [0, length)."""
    pos = 0
    for seg in segments:
        if seg.start != pos or seg.end <= seg.start:
            raise ValueError(f"segments must be contiguous and non-empty, covering [0, {length}); got {segments}")
        pos = seg.end
    if pos != length and not (length == 0 and not segments):
        raise ValueError(f"segments cover [0, {pos}) but the response has {length} tokens")


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
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpoUserError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None


def iter_episodes(path: str | Path) -> Iterator[Episode]:
    """Read episodes from a JSONL file; a malformed line raises SpoUserError naming file and line."""
    for lineno, raw in iter_jsonl(path, "episode file"):
        if isinstance(raw, dict) and raw.get("schema_version", SCHEMA_VERSION) not in READABLE_VERSIONS:
            raise SpoUserError(
                f"{path}:{lineno}: episode schema_version {raw.get('schema_version')!r}; "
                f"this spo reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            yield Episode.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(record)"
            raise SpoUserError(f"{path}:{lineno}: bad episode: {field}: {err['msg']}") from None


def read_episodes(path: str | Path) -> list[Episode]:
    """All episodes of a JSONL file; an empty file is an error (a stage given nothing to work on was given the
    wrong file)."""
    episodes = list(iter_episodes(path))
    if not episodes:
        raise SpoUserError(f"{path}: no episodes (the file is empty)")
    return episodes


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> None:
    """Write episodes as JSONL atomically (a crash leaves either the old file or the new one)."""
    with atomic_open(path) as fh:
        for ep in episodes:
            # Records are written in the current schema, whatever version they were read in.
            fh.write(ep.model_copy(update={"schema_version": SCHEMA_VERSION}).model_dump_json())
            fh.write("\n")
