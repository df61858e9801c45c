"""The partition and estimate stages run on saved episode files (`spo partition`, `spo estimate-values`).

They call the same stage functions as `spo train`; what they add is loading the policy when a stage
needs one: scoring episodes that lack log-probabilities, and sampling Monte Carlo rollouts; and loading a
run's critic for gae and segment_gae.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spo_cli.credit import estimated_credit
from spo_cli.episode import Episode, iter_jsonl, model_fit_problem, read_numbered_episodes, write_episodes
from spo_cli.errors import SpoUserError
from spo_cli.estimate import estimate_advantages, needs_critic, needs_policy
from spo_cli.estimate.critic.model import episode_values, load_critic
from spo_cli.estimate.rollout import build_state_values
from spo_cli.estimate.tree.growth import grow_trees
from spo_cli.partition import partition_episodes
from spo_cli.policy import score_responses
from spo_cli.policy_loading import command_runtime, load_policy
from spo_cli.recipe import Entropy, McTree, Recipe, Step, Whole
from spo_cli.sample import build_sampler, sampling_params
from spo_cli.tasks import apply_template, build_task


def check_episodes_fit(numbered: list[tuple[int, Episode]], path: Path, model, what: str) -> None:
    """Refuse, naming file and line, the first episode `model` cannot run on (a token id outside its vocabulary, more
    tokens than its context, no prompt), before any forward pass fails on it deep inside the model."""
    vocab_size = model.get_input_embeddings().num_embeddings
    _check_fit(numbered, path, vocab_size, getattr(model.config, "max_position_embeddings", None), what)


def check_episodes_fit_policy_dir(numbered: list[tuple[int, Episode]], path: Path, policy_dir: Path) -> None:
    """`check_episodes_fit` against the --policy model's config.json, without loading its weights: a stage that never
    runs the model (scored episodes, a group estimator) must not write episodes it could not have sampled."""
    from spo_cli.models import check_model_dir

    if not (policy_dir / "config.json").is_file():
        raise SpoUserError(f"--policy {policy_dir}: not a Hugging Face model directory (no config.json)")
    config = check_model_dir(policy_dir, "--policy")
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int):
        _check_fit(numbered, path, vocab_size, getattr(config, "max_position_embeddings", None), str(policy_dir))


def _check_fit(
    numbered: list[tuple[int, Episode]], path: Path, vocab_size: int, max_context: int | None, what: str
) -> None:
    for lineno, episode in numbered:
        problem = model_fit_problem(episode, vocab_size, max_context)
        if problem is not None:
            raise SpoUserError(f"{path}:{lineno}: bad episode: {problem} (checked against {what})")


def partition_file(recipe: Recipe, input_path: Path, output_path: Path, policy_dir: Path | None, log: Callable[[str], None]) -> int:
    numbered = read_numbered_episodes(input_path)
    if policy_dir is not None:
        check_episodes_fit_policy_dir(numbered, input_path, policy_dir)
    episodes = [ep for _, ep in numbered]
    spec = recipe.partitioner
    need_entropy = isinstance(spec, Entropy)
    unscored = [
        i
        for i, ep in enumerate(episodes)
        if ep.response_logprobs is None or (need_entropy and ep.response_entropies is None)
    ]
    tokenizer = None
    if unscored or isinstance(spec, Step):
        runtime = command_runtime(recipe)
        model, tokenizer = load_policy(recipe, policy_dir, runtime)
        check_episodes_fit(numbered, input_path, model, str(policy_dir or "the recipe model"))
        if unscored:
            log(f"scoring {len(unscored)} episodes without log-probabilities with {policy_dir or 'the recipe model'}")
            episodes = _score(episodes, unscored, model, tokenizer, recipe, runtime)
    try:
        parted = partition_episodes(episodes, spec, tokenizer)
    except ValueError as exc:
        raise SpoUserError(f"{input_path}: {exc}") from None
    write_episodes(output_path, parted)
    return len(parted)


def estimate_file(
    recipe: Recipe,
    input_path: Path,
    output_path: Path,
    policy_dir: Path | None,
    log: Callable[[str], None],
    critic_dir: Path | None = None,
    iteration: int = 1,
) -> dict[str, float]:
    if isinstance(recipe.estimator, McTree) and is_prompt_file(input_path):
        return grow_trees_file(recipe, input_path, output_path, policy_dir, iteration, log)
    numbered = read_numbered_episodes(input_path)
    if policy_dir is not None:
        check_episodes_fit_policy_dir(numbered, input_path, policy_dir)
    episodes = [ep for _, ep in numbered]
    state_values, critic_values, task = None, None, None
    if needs_critic(recipe.estimator):
        critic_values = _critic_values(recipe, critic_dir, log, numbered, input_path)
    elif critic_dir is not None:
        raise SpoUserError(
            f"--critic: estimator.kind={recipe.estimator.kind} reads no critic "
            "(only gae and segment_gae with estimator.critic set do)"
        )
    try:
        if needs_policy(recipe.estimator):
            runtime = command_runtime(recipe)
            model, tokenizer = load_policy(recipe, policy_dir, runtime)
            check_episodes_fit(numbered, input_path, model, str(policy_dir or "the recipe model"))
            log(f"rolling out with {policy_dir or 'the recipe model'}")
            task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
            sampler = build_sampler(recipe.sampling, model, tokenizer, runtime)
            max_context = getattr(model.config, "max_position_embeddings", None)
            state_values = build_state_values(recipe, sampler, tokenizer, task, max_context)
        estimated, stats = estimate_advantages(episodes, recipe.estimator, state_values, critic_values)
    except ValueError as exc:
        raise SpoUserError(f"{input_path}: {exc}") from None
    finally:
        if task is not None:
            task.close()
    write_episodes(output_path, estimated)
    # Episodes saved by a run on a task with a known first error: the same responses, any estimator, compared.
    return {"episodes": float(len(estimated)), **stats, **estimated_credit(episodes, estimated)}


def _critic_values(
    recipe: Recipe,
    critic_dir: Path | None,
    log: Callable[[str], None],
    numbered: list[tuple[int, Episode]],
    input_path: Path,
):
    """The values of a run's saved critic. There is no default: gae's (and segment_gae's) advantages are only
    those of the loop with the critic's weights at that iteration, which only the run has."""
    if critic_dir is None:
        raise SpoUserError(
            f"estimator.kind={recipe.estimator.kind} reads a trained value network: "
            "pass --critic <run_dir>/checkpoints/iter_N/critic, "
            "the critic of the checkpoint before the episodes' iteration (N = iteration - 1)"
        )
    runtime = command_runtime(recipe)
    critic = load_critic(critic_dir, recipe.estimator.critic, recipe.optim, device=runtime.device)
    check_episodes_fit(numbered, input_path, critic.model.backbone, f"the critic in {critic_dir}")
    log(f"valuing states with the critic in {critic_dir}")
    return episode_values(
        critic.model,
        # Padding sits after every real token and is masked out, so its id changes no value.
        pad_id=critic.model.backbone.config.pad_token_id or 0,
        batch_size=recipe.train.per_device_train_batch_size,
        device=runtime.device,
        autocast=runtime.autocast,
    )


def _score(episodes: list[Episode], indices: list[int], model, tokenizer, recipe: Recipe, runtime) -> list[Episode]:
    """Fill missing log-probs (and entropies) with one batched forward pass at the sampling temperature."""
    logprobs, entropies = score_responses(
        model,
        [episodes[i].prompt_token_ids for i in indices],
        [episodes[i].response_token_ids for i in indices],
        pad_id=tokenizer.pad_token_id,
        temperature=recipe.sampling.temperature,
        batch_size=recipe.train.per_device_train_batch_size,
        device=runtime.device,
        autocast=runtime.autocast,
        with_entropy=True,
    )
    out = list(episodes)
    for i, lp, ent in zip(indices, logprobs, entropies):
        ep = episodes[i]
        out[i] = ep.model_copy(
            update={
                "response_logprobs": ep.response_logprobs if ep.response_logprobs is not None else lp,
                "response_entropies": ep.response_entropies if ep.response_entropies is not None else ent,
            }
        )
    return out


def is_prompt_file(path: Path) -> bool:
    """Whether a JSONL file holds prompts (rows without `response_token_ids`) rather than episodes."""
    for _, row in iter_jsonl(path, "input file"):
        return isinstance(row, dict) and "response_token_ids" not in row
    raise SpoUserError(f"{path}: the file is empty")


def read_prompt_file(path: Path) -> list[dict[str, str]]:
    """Rows {"id"?, "question" or "prompt", "gold"}: a question is formatted with the recipe's task template
    (and chat template), a prompt is used as it is."""
    rows = []
    for lineno, row in iter_jsonl(path, "prompt file"):
        if not isinstance(row, dict) or ("question" in row) == ("prompt" in row):
            raise SpoUserError(f"{path}:{lineno}: a prompt row needs exactly one of `question` and `prompt`")
        for key in ("question", "prompt", "gold", "id"):
            if key in row and not isinstance(row[key], str):
                raise SpoUserError(f"{path}:{lineno}: `{key}` must be a string")
        if "gold" not in row:
            raise SpoUserError(f"{path}:{lineno}: missing `gold` (the reference answer the leaves are graded against)")
        rows.append({"id": row.get("id", f"p{len(rows)}"), **row})
    if not rows:
        raise SpoUserError(f"{path}: no prompts")
    return rows


def grow_trees_file(
    recipe: Recipe, input_path: Path, output_path: Path, policy_dir: Path | None, iteration: int, log: Callable[[str], None]
) -> dict[str, float]:
    """SPO-tree standalone: grow a tree per prompt with the policy and write the edges with a non-zero advantage.

    The trees are grown exactly as `spo train` grows them in iteration `iteration` (same seeds), so the same
    prompts in the same order and the same policy give the same edges.
    """
    rows = read_prompt_file(input_path)
    runtime = command_runtime(recipe)
    model, tokenizer = load_policy(recipe, policy_dir, runtime)
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    try:
        prompts = [
            row["prompt"] if "prompt" in row else apply_template(tokenizer, task.format_prompt(row["question"]), task.use_chat_template)
            for row in rows
        ]
        sampler = build_sampler(recipe.sampling, model, tokenizer, runtime)
        params = sampling_params(recipe.sampling, task.stop, getattr(model.config, "max_position_embeddings", None))
        spec = recipe.estimator
        log(f"growing {len(rows)} trees ({'-'.join(map(str, spec.branching))}) with {policy_dir or 'the recipe model'}")
        questions = [(row["id"], prompt, row["gold"]) for row, prompt in zip(rows, prompts)]
        nodes, grow_stats = grow_trees(
            questions, sampler, tokenizer, task, spec, params, seed=recipe.run.seed, iteration=iteration
        )
        edges, stats = estimate_advantages(partition_episodes(nodes, Whole(), tokenizer), spec)
    except ValueError as exc:
        raise SpoUserError(f"{input_path}: {exc}") from None
    finally:
        task.close()
    write_episodes(output_path, edges)
    return {"episodes": float(len(edges)), **grow_stats, **stats}
