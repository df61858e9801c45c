"""The evaluation sets `spo eval` knows: the recipe's own held-out problems and the named benchmarks.

A benchmark is prompted the way the recipe's model was trained (its task's template and chat template), so
a checkpoint is measured on the format it answers in. Grading follows the benchmark: GSM8K is graded with
the reference "####" rule when the recipe's task answers that way (gsm8k, arith), every other pairing with
math-verify against the gold answer (it also reads "#### 18" and \\boxed{18}).

`BENCHMARKS` is the one place a benchmark name maps to its data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Arith, Gsm8k, Math, Recipe
from spo_cli.tasks import Problem

# (reward, the answer as written, the canonical answer majority voting compares); answers None when absent.
Graded = tuple[float, str | None, str | None]
GradeFn = Callable[[Sequence[str], Sequence[str]], list[Graded]]

DATA_DIR_ENV = "SPO_DATA_DIR"


@dataclass(frozen=True)
class Benchmark:
    name: str
    answer_format: Literal["gsm8k", "math"]  # how the gold answer is read: "#### 18" solutions or MATH records
    local_file: str  # path under the data directory (--data-dir / $SPO_DATA_DIR)
    hub: tuple[str, str | None, str]  # (dataset, config, split) on the Hugging Face Hub


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("gsm8k", "gsm8k", "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test")),
        Benchmark("math500", "math", "math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test")),
        Benchmark("aime24", "math", "aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train")),
        Benchmark("math", "math", "math/test.jsonl", ("EleutherAI/hendrycks_math", "algebra", "test")),
    )
}
TASK = "task"  # the recipe's own held-out problems


@dataclass
class EvalSet:
    """One set of problems with the prompt format and grader an evaluation uses for it."""

    name: str
    problems: list[Problem]
    format_prompt: Callable[[str], str]
    use_chat_template: bool
    stop: tuple[str, ...]
    grade: GradeFn
    close: Callable[[], None] = field(default=lambda: None)


def grade_gsm8k_rule(responses: Sequence[str], golds: Sequence[str]) -> list[Graded]:
    """The reference GSM8K reward with the answer after the last "####" (commas dropped, lower-cased, as compared)."""
    from spo_cli.tasks import gsm8k

    out = []
    for response, gold in zip(responses, golds):
        answer = gsm8k.extract_answer(response)
        key = None if answer is None else answer.replace(",", "").strip().lower()
        out.append((gsm8k.reward(response, gold), answer, key))
    return out


def parse_dataset_names(text: str) -> list[tuple[str, Path | None]]:
    """`--datasets` entries: "task", a benchmark name, or NAME=PATH (a local JSONL file in that benchmark's format)."""
    entries = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, path = part.partition("=")
        name = name.strip()
        if name != TASK and name not in BENCHMARKS:
            known = ", ".join([TASK, *BENCHMARKS])
            raise SpoUserError(f"--datasets: unknown dataset {name!r} (known: {known}; NAME=PATH.jsonl for a local file)")
        if name == TASK and path:
            raise SpoUserError("--datasets: `task` is the recipe's own held-out set; it takes no file")
        entries.append((name, Path(path.strip()) if path else None))
    if not entries:
        raise SpoUserError("--datasets: no dataset given")
    return list(dict.fromkeys(entries))


def build_eval_sets(
    recipe: Recipe, entries: Sequence[tuple[str, Path | None]], data_dir: Path | None, max_problems: int | None
) -> list[EvalSet]:
    """Load every requested set (all data errors surface here, before any model is loaded)."""
    data_dir = data_dir or (Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else None)
    sets = []
    try:
        for name, path in entries:
            if name == TASK:
                sets.append(_task_set(recipe, max_problems))
            else:
                sets.append(_benchmark_set(recipe, BENCHMARKS[name], path, data_dir, max_problems))
    except BaseException:
        for s in sets:
            s.close()
        raise
    return sets


def _task_set(recipe: Recipe, max_problems: int | None) -> EvalSet:
    from spo_cli.tasks import build_task

    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    problems = task.eval_problems()[:max_problems]
    if not problems:
        task.close()
        raise SpoUserError(
            f"--datasets task: the recipe's task ({recipe.task.kind}) has no held-out problems "
            "(set task.test_file, or name a benchmark)"
        )
    grade, close = _grader(recipe, answers_with_marker=_speaks_gsm8k(recipe))
    task.close()  # its own grader is not used: ours also extracts answers
    return EvalSet(
        name=f"{TASK}-{recipe.task.kind}",
        problems=problems,
        format_prompt=task.format_prompt,
        use_chat_template=task.use_chat_template,
        stop=task.stop,
        grade=grade,
        close=close,
    )


def _benchmark_set(
    recipe: Recipe, bench: Benchmark, path: Path | None, data_dir: Path | None, max_problems: int | None
) -> EvalSet:
    from spo_cli.tasks.data import load_hub_records, load_jsonl_records

    if path is not None:
        source = str(path)
        rows = load_jsonl_records(path, f"--datasets {bench.name}={path}")
    elif data_dir is not None:
        local = data_dir / bench.local_file
        if not local.is_file():
            raise SpoUserError(
                f"--datasets {bench.name}: {local} does not exist (the data directory {data_dir} should hold "
                f"{bench.local_file}); or pass {bench.name}=PATH.jsonl"
            )
        source = str(local)
        rows = load_jsonl_records(local, f"--datasets {bench.name}")
    else:
        dataset, config, split = bench.hub
        source = f"hub:{dataset}"
        hint = f"--data-dir DIR with {bench.local_file} in it (e.g. --data-dir ../shared/data), or {bench.name}=PATH.jsonl"
        rows = load_hub_records(dataset, config, split, f"--datasets {bench.name}", hint)
    rows = rows[:max_problems]
    if not rows:
        raise SpoUserError(f"--datasets {bench.name}: {source} has no problems")
    problems = [_to_problem(bench, row, i, source) for i, row in enumerate(rows)]
    gsm8k_rule = bench.answer_format == "gsm8k" and _speaks_gsm8k(recipe)
    grade, close = _grader(recipe, answers_with_marker=gsm8k_rule)
    format_prompt, use_chat_template, stop = _prompt_format(recipe)
    return EvalSet(bench.name, problems, format_prompt, use_chat_template, stop, grade, close)


def _to_problem(bench: Benchmark, row: dict, index: int, source: str) -> Problem:
    from spo_cli.tasks import gsm8k
    from spo_cli.tasks import math as math_task
    from spo_cli.tasks.data import text_field

    where = f"{source}: record {index + 1}"
    if bench.answer_format == "math":
        ident = str(row.get("unique_id") or row.get("id") or f"{bench.name}-{index}")
        question = text_field(row, "problem", where)
        return Problem(id=ident, question=question.strip(), gold=math_task.gold_answer(row, where))
    question, answer = text_field(row, "question", where), text_field(row, "answer", where)
    try:
        gold = gsm8k.gold_answer(answer)
    except SpoUserError as exc:
        raise SpoUserError(f"{where}: {exc}") from None
    return Problem(id=f"{bench.name}-{index}", question=question.strip(), gold=gold)


def _speaks_gsm8k(recipe: Recipe) -> bool:
    """Whether the recipe's model was trained to end with "#### answer" (the reference GSM8K format)."""
    return isinstance(recipe.task, Arith | Gsm8k)


def _prompt_format(recipe: Recipe) -> tuple[Callable[[str], str], bool, tuple[str, ...]]:
    from spo_cli.tasks import gsm8k

    spec = recipe.task
    match spec:
        case Arith():
            return (lambda q: q), spec.use_chat_template, ()
        case Gsm8k():
            return (lambda q: spec.prompt_template.format(question=q)), spec.use_chat_template, (gsm8k.STOP,)
        case Math():
            return (lambda q: spec.prompt_template.format(problem=q)), spec.use_chat_template, ()
    raise AssertionError(f"unhandled task kind {spec.kind!r}")


def _grader(recipe: Recipe, answers_with_marker: bool) -> tuple[GradeFn, Callable[[], None]]:
    if answers_with_marker:
        return grade_gsm8k_rule, lambda: None
    from spo_cli.tasks.math import MathGrader

    timeout = recipe.task.grading_timeout_s if isinstance(recipe.task, Math) else 5.0
    grader = MathGrader(timeout_s=timeout)
    return (lambda responses, golds: grader.grade_and_extract(list(responses), list(golds))), grader.close
