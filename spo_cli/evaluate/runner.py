"""`spo eval`: accuracy of checkpoints on evaluation sets at several generation budgets, resumable.

Output directory layout (default <run_dir>/eval):

    <checkpoint label>/<set>@<budget>.jsonl           every completion, one per line, appended a chunk at a time
    <checkpoint label>/<set>@<budget>.settings.json   what generated them (a re-run with other settings refuses)
    <checkpoint label>/<set>@<budget>.json            the metrics, once the set is finished
    results.json, table.md                            every result of the invocation; the paper-style table
    .spo-eval, .spo-lock                              the marker (which checkpoint folders spo eval made), the lock

spo eval writes only into a missing or empty output directory or one it marked as its own, and refuses one holding
files it did not write, naming them; one eval at a time holds the directory (rundir.claim_eval_out).

A chunk of `chunk_size` problems is sampled with a seed derived from its first problem's index, and its
completions are appended in one write: an interrupted evaluation resumes at its first unfinished chunk and
produces exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spo_cli.errors import SpoUserError
from spo_cli.evaluate.benchmarks import EvalSet
from spo_cli.evaluate.metrics import context_label, summarize
from spo_cli.fsutil import atomic_write_json, atomic_write_text
from spo_cli.recipe import Recipe
from spo_cli.tools.calls import tool_call_metrics

PROMPT_TOO_LONG = "prompt_too_long"  # finish_reason of a problem whose prompt fills the model's whole context


@dataclass(frozen=True)
class EvalSettings:
    """How completions are sampled; part of every result's identity."""

    temperature: float  # 0 = greedy
    top_p: float
    samples: int  # K completions per problem
    seed: int
    chunk_size: int


@dataclass(frozen=True)
class CheckpointRef:
    label: str  # column name, and the sub-directory of the output directory
    path: Path | None  # a Hugging Face model directory; None = the recipe's model as built or downloaded


def resolve_checkpoints(recipe: Recipe, paths: Sequence[Path]) -> list[CheckpointRef]:
    """What to evaluate: each path (a model directory, a checkpoint iter_N, or a run directory's latest
    checkpoint); with no path, the recipe run's latest checkpoint, else its warm start, else the recipe's model.

    Every model directory is checked here (config.json, safetensors weights present and whole), so a damaged one
    is refused before any other is evaluated.
    """
    from spo_cli.checkpoint import latest_checkpoint
    from spo_cli.models import check_model_dir

    if not paths:
        run_dir = recipe.run.run_dir
        ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if ckpt is not None:
            check_model_dir(ckpt / "model")
            return [CheckpointRef(_label(ckpt / "model"), ckpt / "model")]
        if (run_dir / "warm_start" / "config.json").is_file():
            check_model_dir(run_dir / "warm_start")
            return [CheckpointRef(f"{run_dir.name}/warm_start", run_dir / "warm_start")]
        return [CheckpointRef("recipe-model", None)]
    refs: list[CheckpointRef] = []
    for path in paths:
        if (path / "config.json").is_file():
            model_dir = path
        elif (path / "model" / "config.json").is_file():
            model_dir = path / "model"
        elif (ckpt := latest_checkpoint(path) if path.is_dir() else None) is not None:
            model_dir = ckpt / "model"
        else:
            raise SpoUserError(
                f"--checkpoint {path}: not a model directory (no config.json), a checkpoint (no model/config.json) "
                "or a run directory with checkpoints"
            )
        check_model_dir(model_dir)
        label = _label(model_dir)
        taken = {r.label for r in refs}
        base, n = label, 2
        while label in taken:
            label, n = f"{base}-{n}", n + 1
        refs.append(CheckpointRef(label, model_dir))
    return refs


def _check_out_dir(out_dir: Path) -> None:
    """Fail at once, before any model is loaded, when the output directory cannot be written (it is a file, or it or
    the directory it would be made in is read-only); nothing is created."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise SpoUserError(
            f"--out {out_dir}: {existing} is a file; --out names the directory spo eval writes its results into"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except PermissionError as exc:
        raise SpoUserError(
            f"{existing}: {exc.strerror or 'Permission denied'}: cannot write the evaluation there; "
            "pass --out with a directory you can write to"
        ) from None


def _label(model_dir: Path) -> str:
    """<run>/iter_N for a run's checkpoint, else <parent>/<name> (e.g. <run>/warm_start)."""
    model_dir = model_dir.resolve()
    if model_dir.name == "model" and model_dir.parent.parent.name == "checkpoints":
        return f"{model_dir.parent.parent.parent.name}/{model_dir.parent.name}"
    return f"{model_dir.parent.name}/{model_dir.name}"


def evaluate_checkpoints(
    recipe: Recipe,
    checkpoints: Sequence[CheckpointRef],
    sets: Sequence[EvalSet],
    budgets: Sequence[int],
    settings: EvalSettings,
    out_dir: Path,
    log: Callable[[str], None],
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """One result row per (checkpoint, budget, set), in that order; finished results are read back, not redone.

    Writes only into a new or empty `out_dir` or one spo eval marked as its output, holding its lock throughout (see
    rundir.claim_eval_out); `overwrite` redoes the units evaluated now, deleting only their files."""
    from spo_cli.rundir import claim_eval_out

    _check_out_dir(out_dir)
    lock = claim_eval_out(out_dir, [ref.label for ref in checkpoints])
    try:
        rows = []
        for ref in checkpoints:
            engine = _Engine(recipe, ref, log)
            try:
                for budget in budgets:
                    for eval_set in sets:
                        unit = out_dir / ref.label / f"{eval_set.name}@{context_label(budget)}"
                        rows.append(_evaluate_unit(engine, ref, eval_set, budget, settings, unit, log, overwrite))
            finally:
                engine.close()
        atomic_write_json(out_dir / "results.json", {"settings": asdict(settings), "results": rows})
        atomic_write_text(out_dir / "table.md", markdown_table(rows))
    finally:
        lock.release()
    return rows


class _Engine:
    """A checkpoint's model and sampler, loaded on first use (a finished evaluation needs neither)."""

    def __init__(self, recipe: Recipe, ref: CheckpointRef, log: Callable[[str], None]):
        self.recipe, self.ref, self.log = recipe, ref, log
        self.sampler = self.tokenizer = self.model_context = None
        self._tokenizer_only = None

    def load_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self._tokenizer_only is None:
            if self.ref.path is None:
                self.load()
                return self.tokenizer
            from spo_cli.models import load_tokenizer

            self._tokenizer_only = load_tokenizer(self.ref.path)
        return self._tokenizer_only

    def load(self):
        if self.sampler is not None:
            return
        from spo_cli.hardware import resolve_runtime
        from spo_cli.models import load_checkpoint
        from spo_cli.sample import build_sampler, check_backend_installed

        check_backend_installed(self.recipe.sampling)
        runtime = resolve_runtime(self.recipe.hardware)
        if self.ref.path is not None:
            self.log(f"{self.ref.label}: loading {self.ref.path}")
            model, tokenizer = load_checkpoint(self.ref.path)
        else:
            from spo_cli.policy_loading import initial_policy

            self.log(f"{self.ref.label}: the recipe's model, untrained")
            policy = initial_policy(self.recipe)
            model, tokenizer = policy.model, policy.tokenizer
        model = model.to(runtime.device).eval().requires_grad_(False)
        self.model_context = getattr(model.config, "max_position_embeddings", None)
        if self.recipe.sampling.max_context_length is not None:
            self.model_context = self.recipe.sampling.max_context_length
        self.tokenizer = tokenizer
        self.sampler = build_sampler(self.recipe.sampling, model, tokenizer, runtime, seed=self.recipe.run.seed)

    def close(self):
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()


def _evaluate_unit(
    engine: _Engine,
    ref: CheckpointRef,
    eval_set: EvalSet,
    budget: int,
    settings: EvalSettings,
    unit: Path,
    log: Callable[[str], None],
    overwrite: bool,
) -> dict[str, Any]:
    from spo_cli.tasks import apply_template

    completions_path = unit.with_suffix(".jsonl")
    result_path = unit.with_suffix(".json")
    settings_path = unit.with_suffix(".settings.json")
    if overwrite:
        for path in (completions_path, result_path, settings_path):
            path.unlink(missing_ok=True)
    tokenizer = engine.load_tokenizer()
    problems = eval_set.problems
    prompts = [apply_template(tokenizer, eval_set.format_prompt(p.question), eval_set.use_chat_template) for p in problems]
    identity = {
        **asdict(settings),
        "checkpoint": str(ref.path) if ref.path is not None else "recipe model",
        "context_tokens": budget,
        "stop": sorted({*eval_set.stop, *engine.recipe.sampling.stop}),
    }
    tools = engine.recipe.sampling.tools
    if tools is not None:  # completions with and without tools never mix in one unit
        identity["tools"] = tools.model_dump(mode="json")
    _check_settings(settings_path, identity)
    records = _finished_records(completions_path, settings, prompts, [p.gold for p in problems])
    done = len(records) // settings.samples
    if done < len(problems):
        records.extend(_sample_rest(engine, ref, eval_set, budget, settings, prompts, identity, done, unit, log))
    metrics = _metrics(records, settings.samples, tools=tools is not None)
    saved = _read_settings(settings_path)
    result = {
        "checkpoint": ref.label,
        "checkpoint_path": identity["checkpoint"],
        "dataset": eval_set.name,
        "context": context_label(budget),
        "context_tokens": budget,
        "max_new_tokens": saved.get("max_new_tokens", budget),
        "num_problems": len(problems),
        "samples": settings.samples,
        **metrics,
        "completions": str(completions_path),
    }
    atomic_write_json(result_path, result)
    return result


def _sample_rest(
    engine: _Engine, ref: CheckpointRef, eval_set: EvalSet, budget: int, settings: EvalSettings, prompts: list[str],
    identity: dict[str, Any], done: int, unit: Path, log: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Sample and grade the problems after the first `done`, chunk by chunk, each chunk appended to the unit's
    completions as it finishes (where an interrupted eval resumes); returns the new records."""
    from spo_cli.sample import SamplingParams
    from spo_cli.seeding import derive_seed

    problems = eval_set.problems
    completions_path, settings_path = unit.with_suffix(".jsonl"), unit.with_suffix(".settings.json")
    sampled: list[dict[str, Any]] = []
    engine.load()
    max_new = budget
    if engine.model_context is not None and budget > engine.model_context:
        log(
            f"warning: context {context_label(budget)} ({budget} tokens) is longer than the model's context of "
            f"{engine.model_context} tokens: generating at most {engine.model_context}"
        )
        max_new = engine.model_context
    params = SamplingParams(
        n=settings.samples,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=max_new,
        max_total_tokens=engine.model_context,
        stop=tuple(identity["stop"]),
        logprobs=False,
    )
    atomic_write_json(settings_path, {**identity, "max_new_tokens": max_new, "problems": len(problems)})
    prompt_lengths = [len(ids) for ids in engine.sampler.encode_prompts(prompts[done:])]
    lengths = dict(zip(range(done, len(problems)), prompt_lengths))
    log(
        f"{ref.label}: {eval_set.name} at {context_label(budget)}: "
        + (f"resuming at problem {done + 1} of {len(problems)}" if done else f"{len(problems)} problems")
    )
    for start in range(done, len(problems), settings.chunk_size):
        indices = range(start, min(start + settings.chunk_size, len(problems)))
        fits = [i for i in indices if engine.model_context is None or lengths[i] < engine.model_context]
        seed = derive_seed(settings.seed, "eval", eval_set.name, start)
        groups = engine.sampler.generate([prompts[i] for i in fits], params, seed=seed) if fits else []
        by_index = dict(zip(fits, groups))
        chunk = _graded_records(eval_set, problems, prompts, indices, by_index, settings.samples)
        _append_records(completions_path, chunk)
        sampled.extend(chunk)
    return sampled


def _read_settings(path: Path) -> dict[str, Any]:
    """What a unit's settings file says; {} when it is missing or unreadable (a kill mid-write cannot leave one torn,
    but a hand-edited one could be), in which case the completions themselves are checked against the prompts."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _check_settings(path: Path, identity: dict[str, Any]) -> None:
    saved = _read_settings(path)
    if not saved:
        return
    differ = [key for key, value in identity.items() if saved.get(key) != value]
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} before, {identity[k]!r} now" for k in differ)
        raise SpoUserError(
            f"{path.with_suffix('').with_suffix('.jsonl')} was generated with other settings ({detail}); "
            "pass --overwrite to redo it, or --out for another output directory"
        )


def _finished_records(
    path: Path, settings: EvalSettings, prompts: Sequence[str], golds: Sequence[str]
) -> list[dict[str, Any]]:
    """The completions of whole finished chunks; a partly written chunk (a kill mid-append) is dropped from the file.

    Raises SpoUserError when they were generated for other prompts or answers (a changed template, data file or
    tokenizer): their problems would not be the ones being evaluated.
    """
    from spo_cli.metrics import read_records

    problems = len(prompts)
    records = read_records(path, repair="unreadable completions: pass --overwrite to redo them")  # or SpoUserError
    per_chunk = settings.chunk_size * settings.samples
    keep = len(records)
    if keep < problems * settings.samples:
        keep -= keep % per_chunk
    keep = min(keep, problems * settings.samples)
    expected = [(i, j) for i in range(keep // settings.samples) for j in range(settings.samples)]
    if [(r.get("problem"), r.get("sample")) for r in records[:keep]] != expected:
        raise SpoUserError(f"{path}: the completions are not in the order spo writes them; pass --overwrite to redo them")
    for r in records[:keep:settings.samples]:
        i = r["problem"]
        if r.get("prompt") != prompts[i] or r.get("gold") != golds[i]:
            raise SpoUserError(
                f"{path}: problem {i + 1} was evaluated with another prompt or gold answer (the template, the data or "
                "the tokenizer changed); pass --overwrite to redo it, or --out for another output directory"
            )
    kept = "".join(json.dumps(r) + "\n" for r in records[:keep])
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != kept:  # a partial chunk or a torn line
        atomic_write_text(path, kept)
    return records[:keep]


def _graded_records(eval_set: EvalSet, problems, prompts, indices, by_index, samples: int) -> list[dict[str, Any]]:
    texts = [c.text for i in indices if i in by_index for c in by_index[i]]
    golds = [problems[i].gold for i in indices if i in by_index for _ in by_index[i]]
    graded = iter(eval_set.grade(texts, golds) if texts else [])
    records = []
    for i in indices:
        completions = by_index.get(i)
        for j in range(samples):
            base = {"problem": i, "sample": j, "id": problems[i].id, "prompt": prompts[i], "gold": problems[i].gold}
            if completions is None:
                records.append(
                    {**base, "response": "", "answer": None, "vote": None, "reward": 0.0, "correct": False,
                     "finish_reason": PROMPT_TOO_LONG, "response_tokens": 0}
                )  # fmt: skip
                continue
            c = completions[j]
            reward, answer, vote = next(graded)
            records.append(
                {**base, "response": c.text, "answer": answer, "vote": vote, "reward": reward, "correct": reward >= 1.0,
                 "finish_reason": c.finish_reason, "response_tokens": len(c.token_ids)}
                | ({"tool_calls": c.tool_calls} if c.tool_calls else {})
            )  # fmt: skip
    return records


def _append_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def _metrics(records: list[dict[str, Any]], samples: int, tools: bool = False) -> dict[str, float]:
    rows = [records[i : i + samples] for i in range(0, len(records), samples)]
    out = summarize([[r["correct"] for r in row] for row in rows], [[r["vote"] for r in row] for row in rows])
    n = max(len(records), 1)
    out["mean_response_tokens"] = sum(r["response_tokens"] for r in records) / n
    out["truncated"] = sum(r["finish_reason"] == "length" for r in records) / n
    out["no_answer"] = sum(r["answer"] is None for r in records) / n
    out["prompts_too_long"] = float(sum(r["finish_reason"] == PROMPT_TOO_LONG for r in records[::samples]))
    if tools:
        out |= tool_call_metrics([r.get("tool_calls", []) for r in records])
    return out


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 1 layout: a row per (context, dataset), a column per checkpoint, accuracy in percent."""
    columns = list(dict.fromkeys(r["checkpoint"] for r in rows))
    keys = list(dict.fromkeys((r["context"], r["dataset"]) for r in rows))
    cell = {(r["context"], r["dataset"], r["checkpoint"]): f"{100 * r['accuracy']:.1f}" for r in rows}
    body = [[context, dataset, *(cell.get((context, dataset, c), "") for c in columns)] for context, dataset in keys]
    return ["context", "dataset", *columns], body


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    samples = rows[0]["samples"] if rows else 1
    metric = "accuracy (pass@1" + (f", mean over {samples} samples" if samples > 1 else "") + "), %"
    return f"{metric}\n\n" + "\n".join(lines) + "\n"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The results table on stdout, with the other metrics of each row (avg@K, pass@K, maj@K) beside it."""
    from rich.console import Console
    from rich.table import Table

    header, body = table_cells(rows)
    table = Table(title=markdown_table(rows).split("\n", 1)[0])
    for name in header:
        table.add_column(name, justify="left" if name in ("context", "dataset") else "right")
    for row in body:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for r in rows:
        extra = {k: v for k, v in r.items() if "@" in k}
        if extra:
            console.print(f"{r['checkpoint']}  {r['dataset']}@{r['context']}  " + "  ".join(f"{k} {100 * v:.1f}" for k, v in extra.items()))
