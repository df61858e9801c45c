"""Single-stream SPO's per-prompt value tracker: an explicit state object, saved in every checkpoint.

The reference keeps alpha, beta and the stored samples as local variables of its training loop, so a
resumed run restarts them from the offline values; here `state_dict` / `load_state_dict` round-trip the
whole state exactly (floats through JSON are exact; stored log-probs are kept as float32, as computed).
The math lives in `spo_cli.estimate.single_stream.advantages`; the policy forward passes that measure D are the
caller's (`score` below), so this module needs no torch.
"""

from __future__ import annotations

import base64
import json
import random
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_cli.estimate.single_stream.advantages import (
    belief_update,
    belief_value,
    forgetting_factor,
    initial_belief,
    policy_distance,
    sampling_weights,
    weighted_sample_without_replacement,
)
from spo_cli.recipe import SingleStream
from spo_cli.seeding import derive_seed

TRACKER_FILE = "single_stream_tracker.json"

# (prompt token ids, response token ids) per sequence -> each response's token log-probs under the current policy
ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], list[list[float]]]


@dataclass
class StoredSample:
    """The response of a prompt's last visit and its log-probs under the policy right after that step's update."""

    prompt_token_ids: array  # 'q': int64
    response_token_ids: array  # 'q': int64
    logprobs: array  # 'f': float32, as the policy computed them
    # Response tokens a tool wrote (Episode.tool_spans): D measures the policy on its own tokens only.
    tool_spans: tuple[tuple[int, int], ...] = ()

    def policy_positions(self) -> list[int]:
        tool = {t for start, end in self.tool_spans for t in range(start, end)}
        return [t for t in range(len(self.response_token_ids)) if t not in tool]


@dataclass
class PromptBelief:
    alpha: float
    beta: float
    visits: int = 0
    last: StoredSample | None = None

    @property
    def value(self) -> float:
        return belief_value(self.alpha, self.beta)


@dataclass
class ObserveStats:
    distances: list[float] = field(default_factory=list)
    rhos: list[float] = field(default_factory=list)
    first_visits: int = 0


class PromptValueTracker:
    """Beta(alpha, beta) beliefs of every training prompt that has an offline estimate, keyed by prompt text."""

    def __init__(self, spec: SingleStream, beliefs: dict[str, PromptBelief] | None = None):
        self.spec = spec
        self.beliefs: dict[str, PromptBelief] = beliefs or {}

    @classmethod
    def from_offline_values(cls, spec: SingleStream, offline: Mapping[str, Sequence[float]], seed: int) -> PromptValueTracker:
        """Initial beliefs from `{prompt: [scores]}` (docs/algorithms.md#single-stream-initial-beliefs). Lists
        longer than `offline_samples` are cut to a seeded random sample of that many, as the reference does
        (unseeded there)."""
        beliefs = {}
        for key, scores in offline.items():
            scores = list(scores)
            if spec.offline_samples and len(scores) > spec.offline_samples:
                scores = random.Random(derive_seed(seed, "offline-init", key)).sample(scores, spec.offline_samples)
            if spec.offline_samples and not scores:
                continue
            alpha, beta = initial_belief(scores, spec.offline_samples, spec.rho_min, spec.init, spec.binarize_above)
            beliefs[key] = PromptBelief(alpha, beta)
        return cls(spec, beliefs)

    @classmethod
    def uninformed(cls, spec: SingleStream, keys: Sequence[str]) -> PromptValueTracker:
        """Every prompt at Beta(0.5, 0.5): `offline_samples: 0`, no offline pass."""
        return cls(spec, {key: PromptBelief(0.5, 0.5) for key in keys})

    def __len__(self) -> int:
        return len(self.beliefs)

    def __contains__(self, key: str) -> bool:
        return key in self.beliefs

    def value(self, key: str) -> float:
        return self.beliefs[key].value

    def select(self, keys: Sequence[str], count: int, rng: random.Random) -> list[int]:
        """Indices into `keys` of `count` distinct prompts, drawn by prioritised sampling
        (docs/algorithms.md#single-stream-prompt-sampling).

        Prompts the tracker does not know (no offline value) have weight 0. With `weights: thompson` each
        known prompt's v is a draw from its Beta belief instead of the mean (an extension).
        """
        sampling = self.spec.prompt_sampling
        values: list[float | None] = []
        for key in keys:
            belief = self.beliefs.get(key)
            if belief is None:
                values.append(None)
            elif sampling.weights == "thompson":
                values.append(rng.betavariate(belief.alpha, belief.beta))
            else:
                values.append(belief.value)
        weights = sampling_weights(values, sampling.epsilon)
        if sum(weights) == 0:
            # The reference falls back to uniform when every weight is 0 (epsilon = 0 and all prompts solved).
            weights = [0.0 if v is None else 1.0 for v in values]
        return weighted_sample_without_replacement(weights, count, rng)

    def observe(self, keys: Sequence[str], rewards: Sequence[float], samples: Sequence[StoredSample], score: ScoreFn | None) -> ObserveStats:
        """Update the beliefs with this step's outcomes, after the policy update (steps 7-8 of
        docs/algorithms.md#single-stream-order-of-one-step).

        `keys[i]`, `rewards[i]`, `samples[i]` describe the i-th response; `samples[i].logprobs` must already hold
        its log-probs under the updated policy. For rho_mode kl, `score` computes the updated policy's log-probs of
        the stored samples of prompts seen before; D = 0 (rho = rho_max) on a first visit. Several responses of one
        prompt (rollout n > 1) share one rho and update in turn; the last one becomes the stored sample.
        """
        spec = self.spec
        stats = ObserveStats()
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self.beliefs:
                raise KeyError(f"prompt has no tracker entry: {key[:80]!r}")
            first_index.setdefault(key, i)
        rho_of: dict[str, float] = {}
        revisits = [key for key in first_index if self.beliefs[key].last is not None]
        if spec.rho_mode == "kl" and revisits:
            if score is None:
                raise ValueError("rho_mode kl needs the policy to score the stored samples")
            stored = [self.beliefs[key].last for key in revisits]
            now = score([list(s.prompt_token_ids) for s in stored], [list(s.response_token_ids) for s in stored])
            for key, sample, logprobs in zip(revisits, stored, now):
                # Compare in float32, the precision the stored log-probs were kept in; the policy's tokens only.
                now_f32, keep = array("f", logprobs), sample.policy_positions()
                then = [sample.logprobs[t] for t in keep]
                distance = policy_distance(then, [now_f32[t] for t in keep], spec.kl_estimator)
                stats.distances.append(distance)
                rho_of[key] = forgetting_factor(distance, spec.d_half, spec.rho_min, spec.rho_max)
        for key in first_index:
            if key not in rho_of:
                if self.beliefs[key].last is None:
                    stats.first_visits += 1
                    if spec.rho_mode == "kl":
                        stats.distances.append(0.0)
                rho_of[key] = spec.rho_max
            stats.rhos.append(rho_of[key])
        for key, reward, sample in zip(keys, rewards, samples):
            belief = self.beliefs[key]
            belief.alpha, belief.beta = belief_update(belief.alpha, belief.beta, reward, rho_of[key])
            belief.visits += 1
            if spec.rho_mode == "kl":
                belief.last = sample
        return stats

    def metrics(self, keys: Sequence[str], stats: ObserveStats) -> dict[str, float]:
        """The reference's spo/* metrics, as batch means over this step's prompts (after the update)."""
        unique = list(dict.fromkeys(keys))
        beliefs = [self.beliefs[k] for k in unique]
        n = max(len(beliefs), 1)
        out = {
            "single_stream/alpha": sum(b.alpha for b in beliefs) / n,
            "single_stream/beta": sum(b.beta for b in beliefs) / n,
            "single_stream/n_eff": sum(b.alpha + b.beta for b in beliefs) / n,
            "single_stream/value": sum(b.value for b in beliefs) / n,
            "single_stream/first_visit_ratio": stats.first_visits / n,
            "single_stream/visits_mean": sum(b.visits for b in beliefs) / n,
            "single_stream/tracked_prompts": float(len(self.beliefs)),
        }
        if stats.rhos:
            out["single_stream/rho"] = sum(stats.rhos) / len(stats.rhos)
            clipped = sum(1 for r in stats.rhos if r in (self.spec.rho_min, self.spec.rho_max))
            out["single_stream/rho_clip_ratio"] = clipped / len(stats.rhos)
        if stats.distances:
            out["single_stream/D"] = sum(stats.distances) / len(stats.distances)
        return out

    # ------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        rows = {}
        for key, b in self.beliefs.items():
            row: dict[str, Any] = {"alpha": b.alpha, "beta": b.beta, "visits": b.visits}
            if b.last is not None:
                row["last"] = {
                    "prompt_token_ids": _encode(b.last.prompt_token_ids),
                    "response_token_ids": _encode(b.last.response_token_ids),
                    "logprobs": _encode(b.last.logprobs),
                }
                if b.last.tool_spans:
                    row["last"]["tool_spans"] = [list(span) for span in b.last.tool_spans]
            rows[key] = row
        return {"version": 1, "beliefs": rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown tracker state version {state.get('version')!r}")
        beliefs = {}
        for key, row in state["beliefs"].items():
            last = row.get("last")
            beliefs[key] = PromptBelief(
                float(row["alpha"]),
                float(row["beta"]),
                int(row["visits"]),
                None
                if last is None
                else StoredSample(
                    _decode(last["prompt_token_ids"], "q"),
                    _decode(last["response_token_ids"], "q"),
                    _decode(last["logprobs"], "f"),
                    tuple((int(start), int(end)) for start, end in last.get("tool_spans", [])),
                ),
            )
        self.beliefs = beliefs

    def save(self, checkpoint_dir: Path) -> None:
        """Write the tracker into a checkpoint directory (before the checkpoint is published)."""
        (checkpoint_dir / TRACKER_FILE).write_text(json.dumps(self.state_dict()))

    def load(self, checkpoint_dir: Path) -> None:
        path = checkpoint_dir / TRACKER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {TRACKER_FILE}: it was not written by a single_stream run")
        self.load_state_dict(json.loads(path.read_text()))


def stored_sample(
    prompt_token_ids: Sequence[int],
    response_token_ids: Sequence[int],
    logprobs: Sequence[float],
    tool_spans: Sequence[tuple[int, int]] = (),
) -> StoredSample:
    spans = tuple((int(start), int(end)) for start, end in tool_spans)
    return StoredSample(array("q", prompt_token_ids), array("q", response_token_ids), array("f", logprobs), spans)


def _encode(values: array) -> str:
    # Fixed little-endian layout, so a checkpoint reads the same on any machine.
    data = array(values.typecode, values)
    if data.itemsize > 1 and not _LITTLE:
        data.byteswap()
    return f"{values.typecode}{data.itemsize}:" + base64.b64encode(data.tobytes()).decode("ascii")


def _decode(text: str, typecode: str) -> array:
    head, _, payload = text.partition(":")
    if head[0] != typecode:
        raise ValueError(f"stored array has type {head[0]!r}, expected {typecode!r}")
    data = array(typecode)
    if int(head[1:]) != data.itemsize:
        raise ValueError(f"stored array has {head[1:]}-byte items, this machine uses {data.itemsize}")
    data.frombytes(base64.b64decode(payload))
    if data.itemsize > 1 and not _LITTLE:
        data.byteswap()
    return data


_LITTLE = array("H", [1]).tobytes()[0] == 1
