"""SPO-tree in the training loop: one tree per prompt is the iteration's sampling, its edges with a non-zero
advantage the training episodes (through the replay buffer when the recipe has one)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from spo_cli.credit import PATH_FIRST_ERROR, tree_paths
from spo_cli.episode import Episode, write_episodes
from spo_cli.estimate.method import MethodSetup, Rollouts, Sample
from spo_cli.estimate.registry import estimate_advantages
from spo_cli.estimate.tree.growth import grow_trees
from spo_cli.estimate.tree.replay import EdgeReplayBuffer
from spo_cli.recipe import McTree, Recipe
from spo_cli.sample import SamplingParams
from spo_cli.sample.episodes import first_error_token, training_prompts
from spo_cli.seeding import derive_seed
from spo_cli.tasks import Task

TREES_DIR = "trees"  # <run_dir>/trees/iter_N.jsonl: every node episode, when logging.save_episodes is on


@dataclass
class TreeMethod:
    spec: McTree
    setup: MethodSetup
    critic: None = None
    rollouts: Rollouts | None = field(default=None, init=False)
    replay: EdgeReplayBuffer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.spec.replay is not None:
            self.replay = EdgeReplayBuffer(self.spec.replay.max_age, self.spec.replay.edges_per_question)
            if self.setup.checkpoint is not None:
                self.replay.load(self.setup.checkpoint)

    def start(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    def sample(self, iteration: int) -> Sample:
        """One tree per prompt (`sample_trees`), its nodes also written to <run_dir>/trees/ when episodes are
        saved."""
        setup, rollouts = self.setup, self.rollouts
        nodes, stats = sample_trees(rollouts.sampler, setup.tokenizer, setup.task, setup.recipe, iteration, rollouts.params)
        if setup.recipe.logging.save_episodes and setup.cluster.is_main:
            write_episodes(setup.run_dir / TREES_DIR / f"iter_{iteration:06d}.jsonl", nodes)
        return Sample(nodes, stats, stats["tree/generated_tokens"])

    def estimate(self, episodes: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimate_advantages(episodes, self.spec)

    def training_episodes(self, estimated: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        """This iteration's edges, or with a replay buffer: a draw from it once they are added."""
        if self.replay is None:
            return estimated, {}
        self.replay.add(estimated, iteration)
        drawn = self.replay.draw(iteration, random.Random(derive_seed(self.setup.recipe.run.seed, "replay", iteration)))
        return drawn, {"replay/size": float(len(self.replay))}

    def after_update(self, trained: list[Episode], iteration: int) -> dict[str, float]:
        return {}

    def save_state(self, checkpoint_dir: Path) -> None:
        if self.replay is not None:
            self.replay.save(checkpoint_dir)


def sample_trees(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params: SamplingParams
) -> tuple[list[Episode], dict[str, float]]:
    """SPO-tree's sampling: one tree per prompt of the iteration; returns its node episodes (wrong leaves marked
    with the first error of their whole path) and the growth metrics."""
    problems, prompts = training_prompts(sampler, tokenizer, task, recipe, iteration)
    questions = [(p.id, prompt, p.gold) for p, prompt in zip(problems, prompts)]
    nodes, stats = grow_trees(questions, sampler, tokenizer, task, recipe.estimator, params, seed=recipe.run.seed, iteration=iteration)
    nodes = mark_path_first_errors(nodes, {p.id: p for p in problems}, task, tokenizer)
    return nodes, {"num_prompts": float(len(problems)), **stats}


def mark_path_first_errors(nodes: list[Episode], problems: dict, task: Task, tokenizer) -> list[Episode]:
    """SPO-tree's wrong leaves, each with the first wrong token of its whole root-to-leaf path
    (`credit.PATH_FIRST_ERROR` in `metadata["tree"]`), on a task that can tell."""
    if task.first_error is None:
        return nodes
    paths = tree_paths(nodes)
    marked = []
    for ep in nodes:
        if ep.id in paths and ep.reward is not None and ep.reward < 1.0:
            ids = [t for node in paths[ep.id] for t in node.response_token_ids]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            first = first_error_token(task, tokenizer, problems[ep.metadata["tree"]["question"]], text, ids)
            ep = ep.model_copy(update={"metadata": {**ep.metadata, "tree": {**ep.metadata["tree"], PATH_FIRST_ERROR: first}}})
        marked.append(ep)
    return marked
