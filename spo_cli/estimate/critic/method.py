"""gae and segment_gae in the training loop: the method owns the critic, which values every iteration's episodes,
trains beside the policy in each micro-batch of the update and is saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spo_cli.episode import Episode
from spo_cli.errors import SpoUserError
from spo_cli.estimate.method import Method, MethodSetup, PlainMethod, Rollouts, Sample, sample_groups
from spo_cli.estimate.registry import estimate_advantages
from spo_cli.recipe import Critic, Gae, SegmentGae

if TYPE_CHECKING:
    from spo_cli.estimate.critic.model import ValueCritic


def critic_method(spec: Gae | SegmentGae, setup: MethodSetup) -> Method:
    """The method of an estimator with a value network; segment_gae without one (`critic: null`) is stateless."""
    if spec.critic is None:
        setup.console.print(
            "segment_gae: no value network (estimator.critic is null): advantages are r - group mean, "
            "lambda = 1; segments are only logged"
        )
        return PlainMethod(spec, setup)
    return CriticMethod(spec, setup, restore_or_build_critic(spec.critic, setup))


@dataclass
class CriticMethod:
    spec: Gae | SegmentGae
    setup: MethodSetup
    critic: ValueCritic
    rollouts: Rollouts | None = field(default=None, init=False)

    def start(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    def sample(self, iteration: int) -> Sample:
        return sample_groups(self.setup, self.rollouts, iteration)

    def estimate(self, episodes: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimate_advantages(episodes, self.spec, critic_values=self._values)

    def training_episodes(self, estimated: list[Episode], iteration: int) -> tuple[list[Episode], dict[str, float]]:
        return estimated, {}

    def after_update(self, trained: list[Episode], iteration: int) -> dict[str, float]:
        return {}  # the critic's step is part of the update (`spo_cli.estimate.critic.loss.step_critic`)

    def save_state(self, checkpoint_dir: Path) -> None:
        from spo_cli.estimate.critic.model import CRITIC_DIR, save_critic

        save_critic(self.critic, checkpoint_dir / CRITIC_DIR)

    def _values(self, episodes: list[Episode]) -> list[list[float]]:
        """The critic's values of episodes' response tokens, each process valuing its share."""
        from spo_cli.estimate.critic.model import episode_values

        setup = self.setup
        values = episode_values(
            self.critic.model,
            pad_id=setup.tokenizer.pad_token_id,
            batch_size=setup.recipe.train.per_device_train_batch_size,
            device=setup.runtime.device,
            autocast=setup.runtime.autocast,
        )
        return setup.cluster.map_shards(values, episodes)


def restore_or_build_critic(spec: Critic, setup: MethodSetup) -> ValueCritic:
    """The critic: restored from the checkpoint when resuming, else built from the policy RL starts from (after the
    warm start)."""
    from spo_cli.estimate.critic.model import CRITIC_DIR, build_critic, load_critic

    recipe, runtime, checkpoint = setup.recipe, setup.runtime, setup.checkpoint
    if checkpoint is not None:
        if not (checkpoint / CRITIC_DIR).is_dir():
            raise SpoUserError(
                f"--resume: checkpoint {checkpoint} has no {CRITIC_DIR}/: it was not written by a run with a critic"
            )
        critic = load_critic(checkpoint / CRITIC_DIR, spec, recipe.optim, device=runtime.device)
    else:
        critic = build_critic(
            setup.policy_model, spec, recipe.optim, vocab_size=len(setup.tokenizer), seed=recipe.run.seed,
            device=runtime.device,
        )  # fmt: skip
    if recipe.hardware.gradient_checkpointing:
        critic.model.backbone.gradient_checkpointing_enable()
    return critic
