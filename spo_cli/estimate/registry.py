"""The estimator registry: `estimator.kind` -> its typed recipe spec, its estimate function and its method.

`spo_cli.estimate` registers the built-in estimators in one table; `register_estimator` also adds a new one (its
spec joins the recipe's `estimator` union, so recipes can name its kind). Torch-free: an entry's method
factory imports what it needs when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spo_cli.episode import Episode
from spo_cli.recipe import add_estimator_spec

if TYPE_CHECKING:
    from spo_cli.estimate.gae import CriticValues
    from spo_cli.estimate.mc_chain import StateValues
    from spo_cli.estimate.method import MethodFactory


@dataclass(frozen=True)
class EstimateInputs:
    """What an estimator may read besides the episodes: Monte Carlo state values sampled with the policy
    (mc_chain, vineppo) and a value network's estimates (gae, segment_gae with a critic)."""

    state_values: StateValues | None = None
    critic_values: CriticValues | None = None


# (partitioned episodes, the estimator's spec, inputs) -> (episodes with segment advantages, metrics)
EstimateFn = Callable[[Sequence[Episode], Any, EstimateInputs], tuple[list[Episode], dict[str, float]]]


def never(spec: Any) -> bool:
    return False


def always(spec: Any) -> bool:
    return True


@dataclass(frozen=True)
class EstimatorEntry:
    """One estimator. `spec` is its recipe section (a Pydantic model whose `kind` literal is the registry key);
    `estimate` fills advantages (also what `spo estimate-values` runs on saved episodes); `method` builds its
    training-loop object (None: `PlainMethod`, for a stateless estimator); `samples_rollouts` and `reads_critic`
    say, for a spec, whether `estimate` needs Monte Carlo state values or a critic's values; `requires_rewards`
    is False for an estimator that reads episodes without a reward (SPO-tree's inner nodes)."""

    spec: type
    estimate: EstimateFn
    method: MethodFactory | None = None
    samples_rollouts: Callable[[Any], bool] = never
    reads_critic: Callable[[Any], bool] = never
    requires_rewards: bool = True

    @property
    def kind(self) -> str:
        return self.spec.model_fields["kind"].default


ESTIMATORS: dict[str, EstimatorEntry] = {}


def register_estimator(entry: EstimatorEntry) -> None:
    """Make `entry.kind` an estimator recipes can name (its spec joins the recipe's `estimator` union)."""
    if entry.kind in ESTIMATORS and ESTIMATORS[entry.kind] != entry:
        raise ValueError(f"estimator kind {entry.kind!r} is already registered")
    ESTIMATORS[entry.kind] = entry
    add_estimator_spec(entry.spec)


def estimator_entry(spec: Any) -> EstimatorEntry:
    """The registered entry of a recipe's estimator spec."""
    entry = ESTIMATORS.get(spec.kind)
    if entry is None or not isinstance(spec, entry.spec):
        raise AssertionError(f"estimator kind {spec.kind!r} has no registered entry for {type(spec).__name__}")
    return entry


def estimate_advantages(
    episodes: Sequence[Episode],
    spec: Any,
    state_values: StateValues | None = None,
    critic_values: CriticValues | None = None,
) -> tuple[list[Episode], dict[str, float]]:
    """Copies of partitioned `episodes` whose segments carry advantages, and the estimator's metrics.

    mc_tree reads the node episodes of whole trees and returns only its training episodes: the edges with a
    non-zero advantage.
    """
    entry = estimator_entry(spec)
    for ep in episodes:
        if ep.segments is None:
            raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
        if ep.reward is None and entry.requires_rewards:
            raise ValueError(f"episode {ep.id} has no reward")
    return entry.estimate(episodes, spec, EstimateInputs(state_values, critic_values))
