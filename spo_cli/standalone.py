"""The partition and estimate stages run on saved episode files (`spo partition`, `spo estimate-values`).

They call the same stage functions as `spo train`; what they add is loading the policy when a stage
needs one: scoring episodes that lack log-probabilities, and sampling Monte Carlo rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spo_cli.episode import Episode, read_episodes, write_episodes
from spo_cli.errors import SpoUserError
from spo_cli.recipe import Entropy, Recipe, Step


def load_policy(recipe: Recipe, policy_dir: Path | None, runtime):
    """(model, tokenizer): the checkpoint in `policy_dir` (HF format), else the recipe's model."""
    from spo_cli.models import load_checkpoint
    from spo_cli.train import initial_policy

    if policy_dir is not None:
        if not (policy_dir / "config.json").is_file():
            raise SpoUserError(f"--policy {policy_dir}: not a Hugging Face model directory (no config.json)")
        model, tokenizer = load_checkpoint(policy_dir)
    else:
        policy = initial_policy(recipe)
        model, tokenizer = policy.model, policy.tokenizer
    return model.to(runtime.device).eval(), tokenizer


def partition_file(recipe: Recipe, input_path: Path, output_path: Path, policy_dir: Path | None, log: Callable[[str], None]) -> int:
    from spo_cli.partition import partition_episodes

    episodes = read_episodes(input_path)
    spec = recipe.partitioner
    need_entropy = isinstance(spec, Entropy)
    unscored = [
        i
        for i, ep in enumerate(episodes)
        if ep.response_logprobs is None or (need_entropy and ep.response_entropies is None)
    ]
    tokenizer = None
    if unscored or isinstance(spec, Step):
        runtime = _runtime(recipe)
        model, tokenizer = load_policy(recipe, policy_dir, runtime)
        if unscored:
            log(f"scoring {len(unscored)} episodes without log-probabilities with {policy_dir or 'the recipe model'}")
            episodes = _score(episodes, unscored, model, tokenizer, recipe, runtime)
    try:
        parted = partition_episodes(episodes, spec, tokenizer)
    except ValueError as exc:
        raise SpoUserError(f"{input_path}: {exc}") from None
    write_episodes(output_path, parted)
    return len(parted)


def estimate_file(recipe: Recipe, input_path: Path, output_path: Path, policy_dir: Path | None, log: Callable[[str], None]) -> dict[str, float]:
    from spo_cli.estimate import estimate_advantages, needs_policy

    episodes = read_episodes(input_path)
    state_values, task = None, None
    try:
        if needs_policy(recipe.estimator):
            from spo_cli.estimate.rollout import build_state_values
            from spo_cli.sample import build_sampler
            from spo_cli.tasks import build_task

            runtime = _runtime(recipe)
            model, tokenizer = load_policy(recipe, policy_dir, runtime)
            log(f"rolling out with {policy_dir or 'the recipe model'}")
            task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
            sampler = build_sampler(recipe.sampling, model, tokenizer, runtime)
            max_context = getattr(model.config, "max_position_embeddings", None)
            state_values = build_state_values(recipe, sampler, tokenizer, task, max_context)
        episodes, stats = estimate_advantages(episodes, recipe.estimator, state_values)
    except ValueError as exc:
        raise SpoUserError(f"{input_path}: {exc}") from None
    finally:
        if task is not None:
            task.close()
    write_episodes(output_path, episodes)
    return {"episodes": float(len(episodes)), **stats}


def _runtime(recipe: Recipe):
    from spo_cli.hardware import resolve_runtime
    from spo_cli.train import set_offline_defaults

    set_offline_defaults(recipe)
    return resolve_runtime(recipe.hardware)


def _score(episodes: list[Episode], indices: list[int], model, tokenizer, recipe: Recipe, runtime) -> list[Episode]:
    """Fill missing log-probs (and entropies) with one batched forward pass at the sampling temperature."""
    from spo_cli.policy import score_responses

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
