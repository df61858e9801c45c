"""An iteration's problems sampled and graded into `Episode` records (the sampling every method shares)."""

from __future__ import annotations

from spo_cli.credit import token_at_char
from spo_cli.episode import Episode
from spo_cli.errors import SpoUserError
from spo_cli.recipe import Recipe
from spo_cli.seeding import derive_seed
from spo_cli.tasks import Task, apply_template
from spo_cli.tools.calls import tool_call_metrics


def training_prompts(sampler, tokenizer, task: Task, recipe: Recipe, iteration: int) -> tuple[list, list[str]]:
    """The iteration's problems and their formatted prompts (over-long prompts dropped)."""
    problems = task.train_problems(iteration, recipe.sampling.prompts_per_iteration, recipe.run.seed)
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    if recipe.sampling.max_prompt_length is not None:
        lengths = [len(ids) for ids in sampler.encode_prompts(prompts)]
        kept = [i for i, n in enumerate(lengths) if n <= recipe.sampling.max_prompt_length]
        problems, prompts = [problems[i] for i in kept], [prompts[i] for i in kept]
        if not problems:
            raise SpoUserError(f"`sampling.max_prompt_length` ({recipe.sampling.max_prompt_length}) drops every prompt")
    return problems, prompts


def sample_episodes(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params
) -> tuple[list[Episode], dict[str, float]]:
    problems, prompts = training_prompts(sampler, tokenizer, task, recipe, iteration)
    episodes = graded_episodes(sampler, tokenizer, task, recipe, iteration, params, problems, prompts)
    stats = {"num_prompts": float(len(problems))}
    if recipe.sampling.tools is not None:
        stats |= tool_metrics(episodes)
    return episodes, stats


def tool_metrics(episodes: list[Episode]) -> dict[str, float]:
    """TRL's names for the sampled responses' `tool_call_metrics`: tools/call_frequency, tools/failure_frequency."""
    calls = tool_call_metrics([ep.metadata.get("tool_calls", []) for ep in episodes])
    return {"tools/call_frequency": calls["tool_call_frequency"], "tools/failure_frequency": calls["tool_failure_frequency"]}


def graded_episodes(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params, problems: list, prompts: list[str],
    metadata=None,
) -> list[Episode]:
    """Sample `params.n` responses per prompt and grade them; `metadata[i]` goes on every episode of prompt i."""
    groups = sampler.generate(prompts, params, seed=derive_seed(recipe.run.seed, "sample", iteration))
    flat = [(i, p, prompt, c) for i, (p, prompt, g) in enumerate(zip(problems, prompts, groups)) for c in g]
    rewards = task.rewards([c.text for *_, c in flat], [p.gold for _, p, _, _ in flat], [c.finish_reason for *_, c in flat])
    return [
        Episode(
            id=f"it{iteration}-{k}",
            group_id=f"it{iteration}-{p.id}",
            iteration=iteration,
            prompt=prompt,
            response=c.text,
            gold=p.gold,
            prompt_token_ids=c.prompt_token_ids,
            response_token_ids=c.token_ids,
            response_logprobs=c.logprobs,
            response_entropies=c.entropies,
            finish_reason=c.finish_reason,
            tool_spans=c.tool_spans,
            reward=r,
            first_error=first_error_token(task, tokenizer, p, c.text, c.token_ids) if r < 1.0 else None,
            metadata=_metadata(metadata[i] if metadata is not None else {}, c),
        )
        for k, ((i, p, prompt, c), r) in enumerate(zip(flat, rewards))
    ]


def _metadata(extra: dict, completion) -> dict:
    """An episode's metadata: the caller's extras, and each tool call's status when the response made calls."""
    return dict(extra) | ({"tool_calls": completion.tool_calls} if completion.tool_calls else {})


def first_error_token(task: Task, tokenizer, problem, text: str, token_ids: list[int]) -> int | None:
    """The response token where a wrong response first departs from a correct solution, on a task that can tell."""
    if task.first_error is None:
        return None
    offset = task.first_error(text, problem)
    if offset is None:
        return None
    return token_at_char(offset, token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
