"""Single-stream SPO in the training loop: prioritised prompts from the training pool, one response each, the
tracker's value as baseline, and the tracker's observation of the outcomes after every update."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from spo_cli.episode import Episode
from spo_cli.errors import SpoUserError
from spo_cli.estimate.method import MethodSetup, Rollouts, Sample
from spo_cli.estimate.registry import estimate_advantages
from spo_cli.estimate.single_stream.advantages import BASELINE_KEY
from spo_cli.estimate.single_stream.tracker import PromptValueTracker
from spo_cli.recipe import SingleStream
from spo_cli.sample.episodes import graded_episodes
from spo_cli.seeding import derive_seed, epoch_slice
from spo_cli.tasks import apply_template


@dataclass
class SingleStreamMethod:
    spec: SingleStream
    setup: MethodSetup
    critic: None = None
    rollouts: Rollouts | None = field(default=None, init=False)
    pool: list = field(default_factory=list, init=False)  # the training problems the tracker values
    tracker: PromptValueTracker | None = field(default=None, init=False)

    def start(self, rollouts: Rollouts) -> None:
        """The pool, and the tracker: restored from the checkpoint when resuming, else initialised from the offline
        values (read from estimator.offline_values, or estimated now with the policy RL starts from)."""
        self.rollouts = rollouts
        self.pool = training_pool(rollouts.sampler, self.setup)
        keys = [self.setup.task.format_prompt(p.question) for p in self.pool]
        checkpoint = self.setup.checkpoint
        self.tracker = restored_tracker(self.spec, checkpoint, self.setup) if checkpoint else self._initial_tracker(keys)

    def sample(self, iteration: int) -> Sample:
        """Prioritised prompts from the pool, each episode carrying its prompt's tracker value from before this
        step's observation (the baseline)."""
        setup, rollouts = self.setup, self.rollouts
        task, recipe, seed = setup.task, setup.recipe, setup.recipe.run.seed
        pool, spec = self.pool, self.spec.prompt_sampling
        if spec.pool_size is not None and spec.pool_size < len(pool):
            pool = [pool[i] for i in epoch_slice(len(pool), (iteration - 1) * spec.pool_size, spec.pool_size, seed)]
        keys = [task.format_prompt(p.question) for p in pool]
        count = recipe.sampling.prompts_per_iteration
        rng = random.Random(derive_seed(seed, "prompt-sampling", iteration))
        try:
            chosen = self.tracker.select(keys, count, rng)
        except ValueError as exc:
            raise SpoUserError(f"single_stream prompt sampling: {exc} (sampling.prompts_per_iteration is {count})") from None
        problems = [pool[i] for i in chosen]
        prompts = [apply_template(setup.tokenizer, keys[i], task.use_chat_template) for i in chosen]
        metadata = [{BASELINE_KEY: {"key": keys[i], "value": self.tracker.value(keys[i])}} for i in chosen]
        episodes = graded_episodes(
            rollouts.sampler, setup.tokenizer, task, recipe, iteration, rollouts.params, problems, prompts, metadata
        )
        generated = float(sum(len(ep.response_token_ids) for ep in episodes))
        return Sample(episodes, {"num_prompts": float(len(problems))}, generated)

    def estimate(self, episodes: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimate_advantages(episodes, self.spec)

    def training_episodes(self, estimated: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimated, {}

    def after_update(self, trained: list[Episode], iteration: int) -> dict[str, float]:
        """Feed this step's rewards to the tracker, rho measured on the updated policy (after the update, as the
        reference: rho measures how far the update moved the policy)."""
        return observe_outcomes(self.tracker, trained, self.rollouts.model, self.setup)

    def save_state(self, checkpoint_dir: Path) -> None:
        self.tracker.save(checkpoint_dir)

    def _initial_tracker(self, keys: list[str]) -> PromptValueTracker:
        spec, console = self.spec, self.setup.console
        if spec.offline_samples == 0:
            console.print(f"single_stream: offline_samples is 0: all {len(keys)} prompts start at Beta(0.5, 0.5)")
            return PromptValueTracker.uninformed(spec, keys)
        offline, source = self._offline_values()
        tracker = PromptValueTracker.from_offline_values(
            spec, {k: offline[k] for k in dict.fromkeys(keys) if k in offline}, self.setup.recipe.run.seed
        )
        report_offline_coverage(tracker, keys, offline, spec.offline_samples, source, console)
        return tracker

    def _offline_values(self) -> tuple[dict[str, list[float]], str]:
        """The offline scores per prompt and where they come from: estimator.offline_values, or sampled now with the
        policy RL starts from into <run_dir>/offline_values.json."""
        from spo_cli.estimate.single_stream.offline_values import (
            DEFAULT_PROMPTS_PER_SHARD, estimate_offline_values, policy_identity, read_offline_values,
        )  # fmt: skip

        spec, setup = self.spec, self.setup
        if spec.offline_values is not None:
            return read_offline_values(Path(spec.offline_values)), spec.offline_values
        out = setup.run_dir / "offline_values.json"
        setup.console.print(f"single_stream: estimating offline values ({spec.offline_samples} responses per prompt) into {out}")
        offline = estimate_offline_values(
            setup.recipe, setup.task, self.rollouts.sampler, setup.tokenizer, out,
            samples_per_prompt=spec.offline_samples, max_scores_per_prompt=spec.offline_samples,
            prompts_per_shard=DEFAULT_PROMPTS_PER_SHARD, policy_label=policy_identity(setup.recipe, setup.warm_start_dir),
            max_context=self.rollouts.max_context, log=setup.console.print, cluster=setup.cluster,
        )  # fmt: skip
        return offline, str(out)


def training_pool(sampler, setup: MethodSetup) -> list:
    """The finite training set single-stream SPO tracks, without prompts over sampling.max_prompt_length."""
    task, recipe = setup.task, setup.recipe
    if task.train_pool is None:
        raise SpoUserError(
            "estimator.kind=single_stream tracks a value per training prompt, but this task draws fresh problems every "
            "iteration (arith: set task.train_pool_size)"
        )
    pool = task.train_pool(recipe.run.seed)
    limit = recipe.sampling.max_prompt_length
    if limit is not None:
        prompts = [apply_template(setup.tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in pool]
        lengths = [len(ids) for ids in sampler.encode_prompts(prompts)]
        pool = [p for p, n in zip(pool, lengths) if n <= limit]
    if not pool:
        raise SpoUserError("single_stream: no training prompt fits sampling.max_prompt_length")
    return pool


def restored_tracker(spec: SingleStream, checkpoint: Path, setup: MethodSetup) -> PromptValueTracker:
    tracker = PromptValueTracker(spec)
    try:
        tracker.load(checkpoint)
    except FileNotFoundError as exc:
        raise SpoUserError(f"--resume: {exc}") from None
    setup.console.print(f"single_stream: restored {len(tracker)} prompt values from {checkpoint}")
    return tracker


def report_offline_coverage(
    tracker: PromptValueTracker, keys: list[str], offline: dict, offline_samples: int, source: str, console
) -> None:
    """Say how many training prompts start from an offline value, and warn about those without (never drawn) or
    with fewer scores than asked."""
    missing = sum(1 for k in keys if k not in tracker)
    few = sum(1 for k in dict.fromkeys(keys) if k in offline and len(offline[k]) < offline_samples)
    console.print(f"single_stream: {len(tracker)} of {len(keys)} training prompts have offline values ({source})")
    if missing:
        console.print(
            f"[yellow]warning:[/] {missing} training prompts have no offline value: their sampling weight is 0, "
            "they are never drawn"
        )
    if few:
        console.print(
            f"[yellow]warning:[/] {few} prompts have fewer than {offline_samples} offline scores: their initial "
            "value uses the scores they have"
        )


def observe_outcomes(tracker: PromptValueTracker, episodes: list[Episode], model, setup: MethodSetup) -> dict[str, float]:
    """Feed this step's rewards to the tracker, with rho measured on the updated policy (steps 7-8 of
    docs/algorithms.md#single-stream-order-of-one-step).

    Every process holds the same tracker and feeds it the same outcomes; the scoring passes are split between them.
    """
    import torch

    from spo_cli.estimate.single_stream.tracker import stored_sample
    from spo_cli.policy import score_responses

    recipe, runtime, pad_id = setup.recipe, setup.runtime, setup.tokenizer.pad_token_id

    def score_part(pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        with torch.no_grad():
            logprobs, _ = score_responses(
                model, [p for p, _ in pairs], [r for _, r in pairs],
                pad_id=pad_id, temperature=recipe.sampling.temperature,
                batch_size=recipe.train.per_device_train_batch_size, device=runtime.device, autocast=runtime.autocast,
            )  # fmt: skip
        return logprobs

    def score(prompt_ids, response_ids) -> list[list[float]]:
        return setup.cluster.map_shards(score_part, list(zip(prompt_ids, response_ids)))

    keys = [ep.metadata[BASELINE_KEY]["key"] for ep in episodes]
    if recipe.estimator.rho_mode == "kl":
        now = score([ep.prompt_token_ids for ep in episodes], [ep.response_token_ids for ep in episodes])
    else:
        now = [[] for _ in episodes]
    samples = [
        stored_sample(ep.prompt_token_ids, ep.response_token_ids, lp, ep.tool_spans) for ep, lp in zip(episodes, now)
    ]
    stats = tracker.observe(keys, [ep.reward for ep in episodes], samples, score)
    return tracker.metrics(keys, stats)
