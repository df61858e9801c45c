"""Offline prompt values for single-stream SPO (docs/algorithms.md#single-stream-offline-values): K scored
responses per training prompt from the policy RL starts from, as the JSON `{prompt_key: [score, ...]}` the tracker
starts from.

The reference splits the data set, runs a validation job per part and merges the dumps with a script. Here one
resumable pass does all three: the training prompts are cut into shards, each finished shard is written to
`<out>.shards/shard_NNNNN.json` on its own, and the shards are merged into `<out>` once all exist. A shard's
samples depend only on the run seed and the shard's index, so a killed run that is started again skips the
finished shards and ends with the same file an uninterrupted run writes. `<out>.shards/manifest.json` holds a
fingerprint of everything that determines the samples, so a resumed run cannot mix shards of different settings.

This module imports no torch: the sampler and tokenizer come from the caller (`spo estimate-values --offline`
or the training loop).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_cli.distributed import LOCAL, Cluster
from spo_cli.errors import SpoUserError
from spo_cli.fsutil import atomic_write_json, atomic_write_text
from spo_cli.policy_loading import command_runtime, load_policy, set_offline_defaults
from spo_cli.recipe import Recipe, Sft, SingleStream
from spo_cli.sample import SamplingParams, build_sampler
from spo_cli.seeding import derive_seed
from spo_cli.tasks import Task, apply_template, build_task

if TYPE_CHECKING:
    from spo_cli.sample import Sampler

DEFAULT_PROMPTS_PER_SHARD = 256
# The reference merge script's default (merge_offline_values.py --max_scores_per_prompt).
DEFAULT_MAX_SCORES_PER_PROMPT = 8
# Responses per prompt when the recipe's estimator does not say (the paper's and the reference's n0).
DEFAULT_SAMPLES_PER_PROMPT = 8
MANIFEST = "manifest.json"
# Bump when the meaning of a shard file changes, so old shard folders are refused rather than misread.
SHARD_FORMAT = 1


# ------------------------------------------------------------------------------------------- settings


def default_samples_per_prompt(recipe: Recipe) -> int:
    """K when --samples-per-prompt is not given: the estimator's offline_samples (n0) for single_stream, else 8."""
    if isinstance(recipe.estimator, SingleStream):
        return recipe.estimator.offline_samples
    return DEFAULT_SAMPLES_PER_PROMPT


def offline_sampling_params(
    recipe: Recipe, task_stop: Sequence[str], samples_per_prompt: int, max_context: int | None
) -> SamplingParams:
    """The recipe's evaluation sampling settings, as the reference samples its offline pass (its validation
    settings, T=0.6, not the training ones); stop strings and context limit are the training ones."""
    spec = recipe.eval
    return SamplingParams(
        n=samples_per_prompt,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        max_new_tokens=spec.max_completion_length or recipe.sampling.max_completion_length,
        max_total_tokens=recipe.sampling.max_context_length or max_context,
        stop=tuple(dict.fromkeys([*recipe.sampling.stop, *task_stop])),
        keep_eos_token=recipe.sampling.keep_eos_token,
        logprobs=False,
    )


def policy_identity(recipe: Recipe, policy_dir: Path | None) -> dict[str, Any]:
    """What identifies the sampling policy in the fingerprint: the recipe's model section, or a saved model
    directory's absolute path with the size and modification time of its config and weight files (so a warm
    start redone into the same folder does not reuse shards of the old weights)."""
    if policy_dir is None:
        return {"model": recipe.model.model_dump(mode="json")}
    files = {}
    for path in sorted(policy_dir.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".pt")):
            stat = path.stat()
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(policy_dir.resolve()), "files": files}


# ----------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class OfflinePrompt:
    # The user-turn text before any chat template: the tracker's key (docs/reference_differences.md#tracker-keys).
    key: str
    text: str  # what the model is given (the key in the chat template when the task uses one)
    gold: str


def require_train_pool(task: Task) -> Callable[[int], list]:
    """The task's finite training set (seed -> problems); a user error for a task that has none."""
    if task.train_pool is None:
        raise SpoUserError(
            f"task {task.name}: offline values are per training prompt, and this task draws fresh problems every "
            "iteration; set task.train_pool_size to train on (and estimate) a fixed pool"
        )
    return task.train_pool


def offline_prompts(task: Task, seed: int, tokenizer) -> list[OfflinePrompt]:
    """The task's training set in pool order, keyed as the tracker keys it."""
    prompts = []
    for problem in require_train_pool(task)(seed):
        key = task.format_prompt(problem.question)
        try:
            text = apply_template(tokenizer, key, task.use_chat_template)
        except ValueError as exc:
            raise SpoUserError(str(exc)) from None
        prompts.append(OfflinePrompt(key=key, text=text, gold=problem.gold))
    return prompts


def drop_long_prompts(
    prompts: list[OfflinePrompt], lengths: Sequence[int], max_prompt_length: int | None
) -> tuple[list[OfflinePrompt], int]:
    """(kept prompts, number dropped): training never samples prompts over sampling.max_prompt_length."""
    if max_prompt_length is None:
        return list(prompts), 0
    kept = [p for p, n in zip(prompts, lengths) if n <= max_prompt_length]
    return kept, len(prompts) - len(kept)


def shard_ranges(n_prompts: int, prompts_per_shard: int) -> list[range]:
    """Consecutive index ranges of `prompts_per_shard` prompts (the last one may be shorter)."""
    return [range(start, min(start + prompts_per_shard, n_prompts)) for start in range(0, n_prompts, prompts_per_shard)]


def shard_seed(seed: int, index: int) -> int:
    """A shard's sampling seed depends on its index only, so it samples the same in whichever run does it."""
    return derive_seed(seed, "offline-values", index)


def shard_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".shards")


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.json"


# -------------------------------------------------------------------------------------- fingerprint


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the keys in order (length-prefixed, so no two key lists share a digest by concatenation)."""
    h = hashlib.sha256()
    for key in keys:
        data = key.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def build_fingerprint(
    *,
    policy: Any,
    task: dict[str, Any],
    params: SamplingParams,
    max_prompt_length: int | None,
    prompts_per_shard: int,
    seed: int,
    keys: Sequence[str],
) -> dict[str, Any]:
    """Everything that decides what the shards hold. The merge settings are left out on purpose: the merge
    is redone on every run, so changing --max-scores-per-prompt reuses the samples."""
    return {
        "format": SHARD_FORMAT,
        "policy": policy,
        "task": task,
        "sampling": {**asdict(params), "stop": list(params.stop), "max_prompt_length": max_prompt_length},
        "samples_per_prompt": params.n,
        "prompts_per_shard": prompts_per_shard,
        "seed": seed,
        "num_prompts": len(keys),
        "prompt_keys_sha256": keys_digest(keys),
    }


def fingerprint_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted names of the fields where two fingerprints differ, with both values (`a.b: old -> new`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            name = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {_short(old.get(key, '(absent)'))} -> {_short(new.get(key, '(absent)'))}")
            else:
                out.extend(fingerprint_differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{path or '(fingerprint)'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_shard_dir(directory: Path, fingerprint: dict[str, Any], write: bool = True) -> None:
    """Create the shard folder with its manifest (when `write`), or check that an existing one was made with the
    same settings."""
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SpoUserError(f"{manifest}: unreadable ({exc}); delete {directory} to start the estimate afresh") from None
        # Round-trip through JSON so tuples and lists compare equal.
        new = json.loads(json.dumps(fingerprint))
        diffs = fingerprint_differences(old, new)
        if diffs:
            raise SpoUserError(
                f"{directory} holds shards sampled with other settings; differing: "
                + "; ".join(diffs)
                + f". Delete {directory} to sample afresh, or choose another --out"
            )
        return
    if directory.is_dir() and any(directory.glob("shard_*.json")):
        raise SpoUserError(f"{directory} holds shards but no {MANIFEST}; delete it or choose another --out")
    if write:
        atomic_write_json(manifest, fingerprint)


# ------------------------------------------------------------------------------------------ shards


def write_shard(path: Path, index: int, keys: Sequence[str], scores: Sequence[Sequence[float]]) -> None:
    # Parallel lists, not a mapping: a key may repeat inside a shard and both lists of scores count.
    atomic_write_json(path, {"shard": index, "keys": list(keys), "scores": [list(s) for s in scores]})


def read_shard(path: Path, index: int, keys: Sequence[str], samples_per_prompt: int) -> list[list[float]]:
    """A finished shard's score lists, checked against the prompts the manifest says it covers."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SpoUserError(f"{path}: unreadable shard ({exc}); delete the file to sample it again") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("shard") != index
        or data.get("keys") != list(keys)
        or not isinstance(scores, list)
        or len(scores) != len(keys)
        or any(not isinstance(s, list) or len(s) != samples_per_prompt for s in scores)
    ):
        raise SpoUserError(f"{path}: does not hold shard {index} of this estimate; delete the file to sample it again")
    return [[float(x) for x in s] for s in scores]


def sample_shard(
    sampler: Sampler, task: Task, prompts: Sequence[OfflinePrompt], params: SamplingParams, seed: int
) -> list[list[float]]:
    """params.n raw (unbinarised) rewards per prompt; the tracker binarises them when it starts."""
    groups = sampler.generate([p.text for p in prompts], params, seed=seed)
    flat = [(p, c) for p, group in zip(prompts, groups) for c in group]
    rewards = task.rewards([c.text for _, c in flat], [p.gold for p, _ in flat], [c.finish_reason for _, c in flat])
    it = iter(rewards)
    return [[float(next(it)) for _ in group] for group in groups]


# ------------------------------------------------------------------------------------------- merge


def merge_scores(
    shards: Iterable[tuple[Sequence[str], Sequence[Sequence[float]]]], max_scores_per_prompt: int, seed: int
) -> tuple[dict[str, list[float]], int]:
    """(values, prompts subsampled): the shards' scores by key, in order of first appearance.

    Scores of a key that appears several times accumulate, as in the reference merge; a list longer than
    `max_scores_per_prompt` is replaced by a random sample of that many, seeded by (seed, key) where the
    reference's is unseeded, so the merge is reproducible.
    """
    merged: dict[str, list[float]] = {}
    for keys, scores in shards:
        for key, values in zip(keys, scores):
            merged.setdefault(key, []).extend(values)
    subsampled = 0
    for key, values in merged.items():
        if len(values) > max_scores_per_prompt:
            subsampled += 1
            merged[key] = random.Random(derive_seed(seed, "offline-merge", key)).sample(values, max_scores_per_prompt)
    return merged, subsampled


def value_statistics(values: dict[str, list[float]]) -> dict[str, float]:
    """The merge script's summary: prompts, scores per prompt, and how often a score counts as a success."""
    counts = [len(v) for v in values.values()]
    scores = [s for v in values.values() for s in v]
    total = len(scores)
    return {
        "prompts": float(len(values)),
        "scores": float(total),
        "min_scores_per_prompt": float(min(counts, default=0)),
        "max_scores_per_prompt": float(max(counts, default=0)),
        "mean_score": sum(scores) / total if total else 0.0,
        "frac_scores_above_0": sum(1 for s in scores if s > 0) / total if total else 0.0,
        "frac_prompts_never_above_0": sum(1 for v in values.values() if not any(s > 0 for s in v)) / len(values)
        if values
        else 0.0,
    }


def format_values(values: dict[str, list[float]]) -> str:
    """The file text: the reference's `json.dump(values, indent=2)` layout, keys in pool order."""
    return json.dumps(values, indent=2) + "\n"


# ------------------------------------------------------------------------------------------- whole


def estimate_offline_values(
    recipe: Recipe,
    task: Task,
    sampler: Sampler,
    tokenizer,
    out_path: Path,
    *,
    samples_per_prompt: int | None = None,
    prompts_per_shard: int = DEFAULT_PROMPTS_PER_SHARD,
    max_scores_per_prompt: int = DEFAULT_MAX_SCORES_PER_PROMPT,
    policy_label: Any,
    max_context: int | None = None,
    log: Callable[[str], None] = print,
    cluster: Cluster = LOCAL,
) -> dict[str, list[float]]:
    """Sample, score and merge the offline values of every training prompt into `out_path`; returns them.

    `sampler` samples the policy whose values these are; `policy_label` identifies that policy in the
    fingerprint (see `policy_identity`); `max_context` is the model's context length, used when the recipe
    sets no sampling.max_context_length. Finished shards under `<out_path>.shards/` are reused.

    With several processes (`cluster`) every process runs this with a sampler that splits each shard between
    them; all decide which shards to skip before any is written, and only the main process writes.
    """
    k = default_samples_per_prompt(recipe) if samples_per_prompt is None else samples_per_prompt
    if k < 1:
        raise SpoUserError(
            f"{k} samples per prompt: estimator.offline_samples is 0 (training starts every prompt at "
            "Beta(0.5, 0.5) without offline values); pass --samples-per-prompt K to estimate anyway"
        )
    if prompts_per_shard < 1 or max_scores_per_prompt < 1:
        raise SpoUserError("--prompts-per-shard and --max-scores-per-prompt must be at least 1")
    seed = recipe.run.seed
    prompts = _fitting_prompts(offline_prompts(task, seed, tokenizer), sampler, recipe.sampling.max_prompt_length, log)
    max_len = recipe.sampling.max_prompt_length
    params = offline_sampling_params(recipe, task.stop, k, max_context)
    fingerprint = build_fingerprint(
        policy=policy_label,
        task=recipe.task.model_dump(mode="json"),
        params=params,
        max_prompt_length=max_len,
        prompts_per_shard=prompts_per_shard,
        seed=seed,
        keys=[p.key for p in prompts],
    )
    directory = shard_dir(out_path)
    open_shard_dir(directory, fingerprint, write=cluster.is_main)
    ranges = shard_ranges(len(prompts), prompts_per_shard)
    done = [i for i in range(len(ranges)) if shard_path(directory, i).is_file()]
    cluster.barrier()
    if done:
        log(f"skipping {len(done)} of {len(ranges)} shards already sampled in {directory}")
    log(f"offline values: {len(prompts)} prompts x {k} samples in {len(ranges)} shards of up to {prompts_per_shard}")
    shard_scores = [
        _shard_scores(sampler, task, [prompts[j] for j in span], params, directory, i, i in done, seed, k, log,
                      len(ranges), cluster.is_main)  # fmt: skip
        for i, span in enumerate(ranges)
    ]
    values, subsampled = merge_scores(shard_scores, max_scores_per_prompt, seed)
    if cluster.is_main:
        atomic_write_text(out_path, format_values(values))
    cluster.barrier()
    stats = value_statistics(values)
    log(
        f"merged into {int(stats['prompts'])} prompts, {int(stats['scores'])} scores "
        f"({int(stats['min_scores_per_prompt'])}-{int(stats['max_scores_per_prompt'])} per prompt; "
        f"{subsampled} prompts subsampled to {max_scores_per_prompt}); mean score {stats['mean_score']:.4f}, "
        f"fraction > 0 {stats['frac_scores_above_0']:.4f}, prompts never > 0 {stats['frac_prompts_never_above_0']:.4f}"
    )
    return values


def _fitting_prompts(prompts: list[OfflinePrompt], sampler, max_len: int | None, log) -> list[OfflinePrompt]:
    """The prompts within sampling.max_prompt_length (the others are skipped, saying how many)."""
    lengths = [len(ids) for ids in sampler.encode_prompts([p.text for p in prompts])] if max_len is not None else []
    prompts, dropped = drop_long_prompts(prompts, lengths, max_len)
    if dropped:
        log(f"skipping {dropped} training prompts longer than sampling.max_prompt_length ({max_len} tokens)")
    if not prompts:
        raise SpoUserError(f"`sampling.max_prompt_length` ({max_len}) drops every training prompt")
    return prompts


def _shard_scores(
    sampler, task: Task, shard_prompts: list[OfflinePrompt], params: SamplingParams, directory: Path, index: int,
    done: bool, seed: int, k: int, log, shards: int, write: bool,
) -> tuple[list[str], list[list[float]]]:  # fmt: skip
    """Shard `index`'s keys and scores: read when a finished shard is on disk, else sampled (and written by the
    main process)."""
    keys = [p.key for p in shard_prompts]
    path = shard_path(directory, index)
    if done:
        return keys, read_shard(path, index, keys, k)
    scores = sample_shard(sampler, task, shard_prompts, params, shard_seed(seed, index))
    if write:
        write_shard(path, index, keys, scores)
    flat = [s for group in scores for s in group]
    log(f"shard {index + 1}/{shards}: {len(keys)} prompts, mean score {sum(flat) / len(flat):.3f}")
    return keys, scores


def read_offline_values(path: str | Path) -> dict[str, list[float]]:
    """A values file `{prompt_key: [score, ...]}` (ours or the reference merge script's), checked."""
    path = Path(path)
    if not path.is_file():
        raise SpoUserError(f"offline values file not found: {path}")
    text = path.read_text(encoding="utf-8")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise SpoUserError(f"{path}: prompt {_short(key)} appears twice (its scores must be one list)")
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise SpoUserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SpoUserError(f"{path}: expected a JSON object {{prompt: [score, ...]}}, got {type(data).__name__}")
    values: dict[str, list[float]] = {}
    for key, scores in data.items():
        if not isinstance(scores, list) or not all(_is_score(s) for s in scores):
            raise SpoUserError(f"{path}: prompt {_short(key)}: expected a list of finite numbers, got {_short(scores)}")
        values[key] = [float(s) for s in scores]
    return values


def _is_score(value: Any) -> bool:
    # JSON true/false parse as bool, a subclass of int: not a score.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def offline_values_file(
    recipe: Recipe,
    output_path: Path,
    policy_dir: Path | None,
    log: Callable[[str], None],
    *,
    samples_per_prompt: int | None = None,
    prompts_per_shard: int | None = None,
    max_scores_per_prompt: int | None = None,
) -> dict[str, list[float]]:
    """`spo estimate-values --offline`: the offline prompt values of single-stream SPO, sampled from --policy
    (or the recipe's model) into `output_path`, resuming from the shards a killed run left."""
    if isinstance(recipe.warm_start, Sft) and policy_dir is None:
        raise SpoUserError(
            "warm_start.kind is sft: the offline values must come from the policy RL starts from, not the recipe's "
            "base model; pass --policy <run_dir>/warm_start (after `spo sft`), or leave estimator.offline_values "
            "unset and let `spo train` estimate them"
        )
    set_offline_defaults(recipe)  # before build_task, which may read a hub dataset
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    try:
        require_train_pool(task)  # before the slow model load
        runtime = command_runtime(recipe)
        model, tokenizer = load_policy(recipe, policy_dir, runtime)
        log(f"sampling offline values with {policy_dir or 'the recipe model'}")
        sampler = build_sampler(recipe.sampling, model, tokenizer, runtime)
        return estimate_offline_values(
            recipe,
            task,
            sampler,
            tokenizer,
            output_path,
            samples_per_prompt=samples_per_prompt,
            prompts_per_shard=prompts_per_shard or DEFAULT_PROMPTS_PER_SHARD,
            max_scores_per_prompt=max_scores_per_prompt or DEFAULT_MAX_SCORES_PER_PROMPT,
            policy_label=policy_identity(recipe, policy_dir),
            max_context=getattr(model.config, "max_position_embeddings", None),
            log=log,
        )
    finally:
        task.close()
