"""The partition and estimate stages on hand-made episodes (no model)."""

from __future__ import annotations

import pytest

from spo_cli.estimate import estimate_advantages
from spo_cli.partition import partition_episodes
from spo_cli.partition.whole import whole_boundaries
from spo_cli.recipe import Group, Rloo, Whole

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


def test_rloo_estimate_fills_segment_advantages_from_the_others_in_the_group():
    eps = [
        make_episode(id="a", group_id="g1", reward=1.0),
        make_episode(id="b", group_id="g1", reward=0.0),
        make_episode(id="c", group_id="g1", reward=0.0),
        make_episode(id="d", group_id="g2", reward=1.0),
    ]
    out, _ = estimate_advantages(partition_episodes(eps, Whole()), Rloo())
    # g1 rewards [1, 0, 0]: a's others average 0, b's and c's average 1/2; g2 has one member.
    assert [ep.segments[0].advantage for ep in out] == pytest.approx([1.0, -0.5, -0.5, 0.0])


def test_estimate_requires_partition():
    with pytest.raises(ValueError, match="partition stage"):
        estimate_advantages([make_episode()], Group())


def test_partition_kinds_through_the_stage():
    from spo_cli.models import build_byte_tokenizer
    from spo_cli.recipe import Cutpoint, Entropy, FixedCount, FixedTokens, Step

    tok = build_byte_tokenizer()
    text = "6*6=36\n36-1=35\n#### 35"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len(text)  # byte tokens: one per character here
    ep = make_episode(
        response=text,
        response_token_ids=ids,
        response_logprobs=[-0.01] * len(ids),
        response_entropies=[0.0] * len(ids),
    )

    def starts(spec, episode=ep):
        (out,) = partition_episodes([episode], spec, tok)
        return [(s.start, s.is_boundary) for s in out.segments]

    # steps: "6*6=36" | "\n36-1=35\n#### 35" (the answer line joins the last step)
    assert starts(Step()) == [(0, True), (6, True)]
    assert starts(FixedTokens(segment_tokens=10)) == [(0, True), (10, True), (20, True)]
    # 22 tokens in 4 parts: 6, 6, 5, 5; the first part's start is not a value state
    assert starts(FixedCount(num_segments=4)) == [(0, False), (6, True), (12, True), (17, True)]
    # every token has p = exp(-0.01) > 0.9: no cutpoint, one leading region
    assert starts(Cutpoint()) == [(0, False)]
    low = ep.model_copy(update={"response_logprobs": [-0.01] * 7 + [-1.0] * 15})
    assert starts(Cutpoint(interval=5), low) == [(0, False), (7, True), (12, True), (17, True)]
    # entropies 0.00, 0.01, ..., 0.21 with token 9 raised to 5.0: the 0.95 quantile of the 22 values sits
    # between the sorted 20th and 21st (0.20 and 0.21) at 0.2095, so tokens 9 (5.0) and 21 (0.21) open segments
    peaked = ep.model_copy(update={"response_entropies": [5.0 if t == 9 else 0.01 * t for t in range(22)]})
    assert starts(Entropy(percentile=0.05), peaked) == [(0, True), (9, True), (21, True)]
    with pytest.raises(ValueError, match="response_entropies"):
        partition_episodes([ep.model_copy(update={"response_entropies": None})], Entropy())
