"""Tasks: where problems come from, how a prompt is written, and how a response is rewarded.

A `Task` is composed of plain functions; `build_task` is the one place a recipe's `task.kind` maps to code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Arith, Gsm8k, Math, TaskSpec
from spo_cli.seeding import derive_seed, epoch_slice


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str
    solution: str | None = None  # a worked solution, for the supervised warm start


@dataclass
class Task:
    name: str
    train_problems: Callable[[int, int, int], list[Problem]]  # (iteration, count, seed) -> problems
    eval_problems: Callable[[], list[Problem]]
    format_prompt: Callable[[str], str]  # question -> prompt text (before any chat template)
    grade: Callable[[Sequence[str], Sequence[str]], list[float]]  # (responses, golds) -> rewards
    use_chat_template: bool = False
    penalize_truncated: bool = False
    stop: tuple[str, ...] = ()
    sft_examples: Callable[[random.Random, int], list[Problem]] | None = None
    # seed -> the finite training set; None when problems are generated fresh every iteration
    train_pool: Callable[[int], list[Problem]] | None = None
    # (response, problem) -> character offset where a wrong response first departs from a correct solution, None
    # when it does not; None for a task that cannot tell (the credit metrics need it)
    first_error: Callable[[str, Problem], int | None] | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def rewards(self, responses: Sequence[str], golds: Sequence[str], finish_reasons: Sequence[str]) -> list[float]:
        """Rewards of finished responses; a truncated one gets 0 when the task penalises truncation."""
        scores = self.grade(responses, golds)
        if self.penalize_truncated:
            scores = [0.0 if f == "length" else s for s, f in zip(scores, finish_reasons)]
        return scores


def apply_template(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if not use_chat_template:
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError("task.use_chat_template is true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def build_task(spec: TaskSpec, prompts_per_iteration: int) -> Task:
    match spec:
        case Arith():
            return _arith_task(spec, prompts_per_iteration)
        case Gsm8k():
            return _gsm8k_task(spec, prompts_per_iteration)
        case Math():
            return _math_task(spec, prompts_per_iteration)
    raise AssertionError(f"unhandled task kind {spec.kind!r}")


def _arith_task(spec: Arith, prompts_per_iteration: int) -> Task:
    from spo_cli.tasks import arith, gsm8k
    from spo_cli.tools.calls import ToolMarkers

    knobs = dict(max_start=spec.max_start, max_add=spec.max_add, max_mul=spec.max_mul, max_val=spec.max_val)
    openers = tuple(spec.step_openers)
    held_out = arith.held_out_problems(spec.eval_seed, spec.eval_per_step, spec.eval_steps, **knobs)
    exclude = frozenset(p.question for p in held_out)

    markers = ToolMarkers()  # the calculator's (the recipe keeps sampling.tools at these)

    operations = "".join(spec.calculator)

    def worked(solution: str, rng: random.Random | None = None) -> str:
        """The solution as the task grades and shows it; with `rng` (the warm start's), calls at calculator_rate."""
        if not operations:
            return solution
        rate = spec.calculator_rate if rng is not None else 1.0
        return arith.with_calculator(solution, markers, operations, rate, rng)

    def to_problem(p: arith.ArithProblem, ident: str) -> Problem:
        return Problem(id=ident, question=p.question, gold=p.answer, solution=worked(p.solution))

    pools: dict[int, list[Problem]] = {}

    def train_pool(seed: int) -> list[Problem]:
        if seed not in pools:
            rng = random.Random(derive_seed(seed, "arith-pool"))
            pool = arith.distinct_problems(rng, spec.train_pool_size, spec.min_steps, spec.max_steps, exclude, **knobs)
            pools[seed] = [to_problem(p, f"pool-{i}") for i, p in enumerate(pool)]
        return list(pools[seed])

    def train_problems(iteration: int, count: int, seed: int) -> list[Problem]:
        if spec.train_pool_size is not None:
            pool = train_pool(seed)
            return [pool[i] for i in epoch_slice(len(pool), iteration * prompts_per_iteration, count, seed)]
        rng = random.Random(derive_seed(seed, "arith-train", iteration))
        batch = arith.sample_problems(rng, count, spec.min_steps, spec.max_steps, exclude, **knobs)
        return [to_problem(p, f"it{iteration}-p{i}") for i, p in enumerate(batch)]

    def sft_examples(rng: random.Random, count: int) -> list[Problem]:
        batch = arith.sample_problems(rng, count, spec.sft_min_steps, spec.sft_max_steps, exclude, **knobs)
        solutions = [worked(arith.with_openers(p.solution, openers, rng), rng) for p in batch]
        return [Problem(id="sft", question=p.question, gold=p.answer, solution=s) for p, s in zip(batch, solutions)]

    return Task(
        name="arith",
        train_problems=train_problems,
        eval_problems=lambda: [to_problem(p, f"eval-{i}") for i, p in enumerate(held_out)],
        format_prompt=lambda q: q,
        grade=lambda responses, golds: [gsm8k.reward(r, g) for r, g in zip(responses, golds)],
        use_chat_template=spec.use_chat_template,
        penalize_truncated=spec.penalize_truncated,
        sft_examples=sft_examples,
        train_pool=train_pool if spec.train_pool_size is not None else None,
        first_error=(
            (lambda response, problem: arith.calculator_first_error(response, problem.solution, markers, operations))
            if operations
            else (lambda response, problem: arith.first_error(response, problem.solution, openers))
        ),
    )


def _load_split(spec: Gsm8k | Math, split: str) -> list[dict]:
    from spo_cli.tasks.data import load_hub_records, load_jsonl_records

    path = spec.train_file if split == "train" else spec.test_file
    if path is not None:
        return load_jsonl_records(path, f"task.{split}_file")
    if spec.dataset_name is None or (split == "test" and spec.train_file is not None):
        return []
    hub_split = spec.dataset_train_split if split == "train" else spec.dataset_test_split
    hint = f"task.{split}_file: ../shared/data/{spec.kind}/{split}.jsonl"
    return load_hub_records(spec.dataset_name, spec.dataset_config, hub_split, "task.dataset_name", hint)


def _source(spec: Gsm8k | Math, split: str) -> str:
    """Where a split's records come from, as errors name it."""
    path = spec.train_file if split == "train" else spec.test_file
    return str(path) if path is not None else f"dataset {spec.dataset_name} ({split})"


def _problems(
    spec: Gsm8k | Math, split: str, limit: int | None, to_problem: Callable[[dict, str, str], Problem]
) -> list[Problem]:
    """A split's problems; `to_problem(record, id, where)` names a bad record by `where`, its file and number."""
    source = _source(spec, split)
    rows = _load_split(spec, split)[:limit]
    return [to_problem(row, f"{split}-{i}", f"{source}: record {i + 1}") for i, row in enumerate(rows)]


def _file_task(
    spec: Gsm8k | Math,
    prompts_per_iteration: int,
    to_problem: Callable[[dict, str, str], Problem],
    format_prompt: Callable[[str], str],
    grade,
    stop: tuple[str, ...],
    close=lambda: None,
) -> Task:
    train = _problems(spec, "train", spec.max_train_problems, to_problem)
    if not train:
        source = f"task.train_file {spec.train_file}" if spec.train_file else f"task.dataset_name {spec.dataset_name}"
        raise SpoUserError(f"{source}: no training problems (the file or split is empty)")

    def train_problems(iteration: int, count: int, seed: int) -> list[Problem]:
        return [train[i] for i in epoch_slice(len(train), iteration * prompts_per_iteration, count, seed)]

    def eval_problems() -> list[Problem]:
        return _problems(spec, "test", spec.max_eval_problems, to_problem)

    return Task(
        name=spec.kind,
        train_problems=train_problems,
        eval_problems=eval_problems,
        format_prompt=format_prompt,
        grade=grade,
        use_chat_template=spec.use_chat_template,
        penalize_truncated=spec.penalize_truncated,
        stop=stop,
        sft_examples=None,
        train_pool=lambda seed: list(train),
        close=close,
    )


def _gsm8k_task(spec: Gsm8k, prompts_per_iteration: int) -> Task:
    from spo_cli.tasks import gsm8k
    from spo_cli.tasks.data import text_field

    def to_problem(row: dict, ident: str, where: str) -> Problem:
        question, answer = text_field(row, "question", where), text_field(row, "answer", where)
        try:
            gold = gsm8k.gold_answer(answer)
        except SpoUserError as exc:
            raise SpoUserError(f"{where}: {exc}") from None
        return Problem(id=ident, question=question.strip(), gold=gold, solution=gsm8k.clean_solution(answer))

    return _file_task(
        spec,
        prompts_per_iteration,
        to_problem,
        lambda q: spec.prompt_template.format(question=q),
        lambda responses, golds: [gsm8k.reward(r, g) for r, g in zip(responses, golds)],
        stop=(gsm8k.STOP,),
    )


def _math_task(spec: Math, prompts_per_iteration: int) -> Task:
    from spo_cli.tasks import math as math_task
    from spo_cli.tasks.data import text_field

    grader = math_task.MathGrader(timeout_s=spec.grading_timeout_s)

    def to_problem(row: dict, ident: str, where: str) -> Problem:
        question = text_field(row, spec.problem_field, where)
        if spec.answer_field is not None:
            gold = text_field(row, spec.answer_field, where, numbers=True).strip()
        else:
            gold = math_task.gold_answer(row, where)
        return Problem(
            id=str(row.get("unique_id") or ident),
            question=question.strip(),
            gold=gold,
            solution=row.get("solution") if spec.answer_field is None else None,
        )

    return _file_task(
        spec,
        prompts_per_iteration,
        to_problem,
        lambda q: spec.prompt_template.format(problem=q),
        grader.grade,
        stop=(),
        close=grader.close,
    )
