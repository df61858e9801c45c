"""`train.episodes_per_iteration`: every iteration trains on exactly that many episodes, as the reference does."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def fit_episode_count(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """Exactly `count` items, as the reference fills an iteration (step 4 of
    docs/reference_settings.md#one-iteration-of-the-reference).

    More items than `count`: a random subset (in random order). Fewer: the list repeated
    ceil(count / len) times, shuffled, then cut, so an item can appear several times or not at all.
    No items: an empty list (there is nothing to train on).
    """
    if not items:
        return []
    if len(items) >= count:
        return rng.sample(list(items), count)
    repeated = list(items) * -(-count // len(items))
    rng.shuffle(repeated)
    return repeated[:count]
