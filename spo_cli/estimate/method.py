"""A method object per `estimator.kind`: what the training loop calls, in order, every iteration.

The loop (`spo_cli.train`) knows the order of the stages and nothing about any method: it asks the method to
sample, partitions, asks it to estimate and to assemble the training set, runs the PPO update (training the
method's `critic` beside the policy when it has one), calls `after_update`, and writes `save_state` into every
checkpoint. A method's state (a tracker, a replay buffer, a critic) lives in its object.

A method is built in two steps, because the policy's training engine sits between them:

1. `EstimatorEntry.method(spec, setup)` runs before the policy is wrapped for training (DeepSpeed ZeRO-3
   partitions its weights), so a method that copies the policy (the critic) does it here.
2. `method.start(rollouts)` runs once the sampler exists, before the first iteration of this start: a method
   whose initial state needs samples (single-stream's offline values) makes it here.

Either step restores the method's state from `setup.checkpoint` when the run resumes. `PlainMethod` is the
method of every stateless estimator: it samples groups of responses and calls the estimator's function.
See docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from spo_cli.episode import Episode
from spo_cli.estimate.registry import estimate_advantages, estimator_entry
from spo_cli.estimate.rollout import build_state_values
from spo_cli.sample.episodes import sample_episodes

if TYPE_CHECKING:
    from rich.console import Console

    from spo_cli.distributed import Cluster
    from spo_cli.estimate.critic.model import ValueCritic
    from spo_cli.estimate.mc_chain import StateValues
    from spo_cli.hardware import Runtime
    from spo_cli.recipe import Recipe
    from spo_cli.sample import Sampler, SamplingParams
    from spo_cli.tasks import Task


@dataclass
class MethodSetup:
    """What a method may use of the run, from before the policy is wrapped for training."""

    recipe: Recipe
    task: Task
    policy_model: Any  # the policy RL starts from (or resumes), before the learner wraps it
    tokenizer: Any
    runtime: Runtime
    cluster: Cluster
    run_dir: Path
    console: Console
    checkpoint: Path | None  # the checkpoint the run resumes from, None on a fresh start
    warm_start_dir: Path | None  # the run's saved warm start (what the policy RL starts from), if it has one


@dataclass
class Rollouts:
    """How a method generates: the sampler over the policy being trained and the training sampling settings."""

    sampler: Sampler
    params: SamplingParams
    model: Any  # the module the sampler runs (for scoring with the current weights)
    max_context: int | None


@dataclass
class Sample:
    """One iteration's sampled episodes (graded; tree nodes for SPO-tree), the sampling metrics, and every token
    the policy generated to produce them (what a comparison at equal sampled tokens counts)."""

    episodes: list[Episode]
    stats: dict[str, float]
    generated_tokens: float


class Method(Protocol):
    """The lifecycle of one estimator in the training loop."""

    # A value model trained beside the policy in every micro-batch of the update (gae, segment_gae), else None.
    critic: ValueCritic | None

    def start(self, rollouts: Rollouts) -> None:
        """Once the sampler exists: restore the state from the setup's checkpoint, or make the initial one."""
        ...

    def sample(self, iteration: int) -> Sample:
        """The iteration's graded episodes."""
        ...

    def estimate(self, episodes: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        """Advantages for the partitioned episodes of this iteration, and the estimator's metrics."""
        ...

    def training_episodes(self, estimated: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        """The episodes the update trains on, from this iteration's estimated ones (SPO-tree: through its replay
        buffer); metrics of the assembly."""
        ...

    def after_update(self, trained: list[Episode], iteration: int) -> dict[str, float]:
        """After the optimizer phase, with the updated policy (single-stream: the tracker's observation)."""
        ...

    def save_state(self, checkpoint_dir: Path) -> None:
        """Write the state an exact resume needs into a checkpoint directory (before it is published)."""
        ...


@dataclass
class PlainMethod:
    """A stateless estimator's method: groups of `sampling.num_generations` responses per prompt, advantages from
    the estimator's function (with Monte Carlo rollouts from the current policy when it samples them), no state."""

    spec: Any
    setup: MethodSetup
    samples_rollouts: bool = False
    critic: None = None
    rollouts: Rollouts | None = field(default=None, init=False)
    state_values: StateValues | None = field(default=None, init=False)

    def start(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts
        if self.samples_rollouts:
            setup = self.setup
            self.state_values = build_state_values(setup.recipe, rollouts.sampler, setup.tokenizer, setup.task, rollouts.max_context)

    def sample(self, iteration: int) -> Sample:
        return sample_groups(self.setup, self._started(), iteration)

    def estimate(self, episodes: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        self._started()
        return estimate_advantages(episodes, self.spec, self.state_values)

    def training_episodes(self, estimated: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimated, {}

    def after_update(self, trained: list[Episode], iteration: int) -> dict[str, float]:
        return {}

    def save_state(self, checkpoint_dir: Path) -> None:
        return None

    def _started(self) -> Rollouts:
        if self.rollouts is None:
            raise RuntimeError("the method was not started: call start(rollouts) first")
        return self.rollouts


MethodFactory = Callable[[Any, MethodSetup], Method]


def sample_groups(setup: MethodSetup, rollouts: Rollouts, iteration: int) -> Sample:
    """`sampling.prompts_per_iteration` prompts, `sampling.num_generations` graded responses each."""
    episodes, stats = sample_episodes(rollouts.sampler, setup.tokenizer, setup.task, setup.recipe, iteration, rollouts.params)
    return Sample(episodes, stats, float(sum(len(ep.response_token_ids) for ep in episodes)))


def build_method(spec: Any, setup: MethodSetup) -> Method:
    """The training-loop object of the recipe's estimator (step 1 above): its registered factory's, or a
    `PlainMethod` for an estimator registered without one."""
    entry = estimator_entry(spec)
    if entry.method is not None:
        return entry.method(spec, setup)
    return PlainMethod(spec, setup, samples_rollouts=entry.samples_rollouts(spec))
