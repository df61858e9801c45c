"""The partition and estimate stages on hand-made episodes (no model)."""

from __future__ import annotations

import pytest

from spo_cli.estimate import estimate_advantages
from spo_cli.partition import partition_episodes
from spo_cli.partition.whole import whole_boundaries
from spo_cli.recipe import Group, Whole

from .test_episode import make_episode


def test_whole_boundaries():
    assert whole_boundaries(5) == [0]
    assert whole_boundaries(0) == []


def test_group_estimate_fills_segment_advantages():
    eps = [
        make_episode(id="a", group_id="g1", reward=1.0),
        make_episode(id="b", group_id="g1", reward=0.0),
        make_episode(id="c", group_id="g2", reward=1.0),
        make_episode(id="d", group_id="g2", reward=1.0),
        make_episode(id="e", group_id="g1", reward=0.0, response_token_ids=[], response_logprobs=[]),
    ]
    parted = partition_episodes(eps, Whole())
    assert [s.model_dump(exclude_none=True) for s in parted[0].segments] == [{"start": 0, "end": 3, "is_boundary": True}]
    assert parted[4].segments == []
    out, _ = estimate_advantages(parted, Group(scale_by_std=False))
    # g1 rewards [1, 0, 0]: mean 1/3
    assert out[0].segments[0].advantage == pytest.approx(2 / 3)
    assert out[1].segments[0].advantage == pytest.approx(-1 / 3)
    assert out[2].segments[0].advantage == 0.0 and out[3].segments[0].advantage == 0.0
    assert eps[0].segments is None, "stages return copies"


def test_estimate_requires_partition():
    with pytest.raises(ValueError, match="partition stage"):
        estimate_advantages([make_episode()], Group())
