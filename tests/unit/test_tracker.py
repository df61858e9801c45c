"""The single-stream tracker object: initialisation, the observe step and an exact state round trip."""

from __future__ import annotations

import json
import random

import pytest

from spo_cli.recipe import SingleStream
from spo_cli.estimate.single_stream.tracker import PromptValueTracker, stored_sample


def _tracker(**fields) -> PromptValueTracker:
    offline = {"a": [1, 1, 1, 0, 0, 0, 0, 0], "b": [0] * 8, "c": [1] * 8}
    return PromptValueTracker.from_offline_values(SingleStream(**fields), offline, seed=0)


def test_initial_values_follow_the_jeffreys_rule():
    tracker = _tracker()
    assert (tracker.beliefs["a"].alpha, tracker.beliefs["a"].beta) == pytest.approx((3.111111, 4.888889), abs=1e-6)
    assert tracker.value("b") == pytest.approx(0.5 / 9)
    assert tracker.value("c") == pytest.approx(8.5 / 9)


def test_longer_score_lists_are_cut_to_n0_with_a_seeded_sample():
    spec = SingleStream(offline_samples=4)
    scores = {"a": [1, 0, 1, 0, 1, 1, 0, 0, 1, 1]}
    first = PromptValueTracker.from_offline_values(spec, scores, seed=3).beliefs["a"]
    second = PromptValueTracker.from_offline_values(spec, scores, seed=3).beliefs["a"]
    assert (first.alpha, first.beta) == (second.alpha, second.beta)
    # 4 kept scores: N0 (s + 0.5) / 5 with N0 = 8 and s in 0..4.
    assert any(first.alpha == pytest.approx(8 * (s + 0.5) / 5) for s in range(5))


def test_observe_first_visit_then_revisit_with_kl_rho():
    tracker = _tracker()
    tracker.beliefs["a"].alpha, tracker.beliefs["a"].beta = 3.0, 5.0
    sample = stored_sample([1, 2], [3, 4], [-1.0, -2.0])
    stats = tracker.observe(["a"], [1.0], [sample], score=None)  # first visit: D = 0, rho = rho_max
    assert stats.first_visits == 1 and stats.rhos == [0.96]
    assert (tracker.beliefs["a"].alpha, tracker.beliefs["a"].beta) == pytest.approx((3.88, 4.80))

    # Revisit: the policy moved every stored log-prob by 0.03 -> D = 0.03 -> rho = 0.875
    # (docs/algorithms.md#single-stream-worked-examples).
    def score(prompt_ids, response_ids):
        assert (prompt_ids, response_ids) == ([[1, 2]], [[3, 4]])
        return [[-1.03, -1.97]]

    stats = tracker.observe(["a"], [0.0], [stored_sample([1, 2], [5], [-0.5])], score=score)
    assert stats.distances == pytest.approx([0.03], abs=1e-6) and stats.rhos == [0.875]
    assert (tracker.beliefs["a"].alpha, tracker.beliefs["a"].beta) == pytest.approx((3.88 * 0.875, 4.80 * 0.875 + 1))
    assert list(tracker.beliefs["a"].last.response_token_ids) == [5] and tracker.beliefs["a"].visits == 2


def test_the_distance_leaves_out_tokens_a_tool_wrote():
    # Tokens 1-2 came from a tool: the policy's log-probs of them moved by 2.0, of its own tokens by 0.03 -> D = 0.03.
    tracker = _tracker()
    tracker.observe(["a"], [1.0], [stored_sample([1], [3, 4, 5, 6], [-1.0, -0.5, -0.5, -2.0], [(1, 3)])], None)

    def score(prompt_ids, response_ids):
        return [[-1.03, -2.5, 1.5, -1.97]]

    stats = tracker.observe(["a"], [0.0], [stored_sample([1], [5], [-0.5])], score=score)
    assert stats.distances == pytest.approx([0.03], abs=1e-6) and stats.rhos == [0.875]


def test_constant_rho_mode_stores_no_samples_and_needs_no_policy():
    tracker = _tracker(rho_mode="constant", rho_max=0.9)
    tracker.observe(["a", "a"], [1.0, 0.0], [stored_sample([1], [2], [])] * 2, score=None)
    alpha0, beta0 = 8 * 3.5 / 9, 8 * 5.5 / 9
    # Two sequential updates of one prompt (rollout n = 2), both with rho = 0.9.
    assert tracker.beliefs["a"].alpha == pytest.approx((alpha0 * 0.9 + 1) * 0.9)
    assert tracker.beliefs["a"].beta == pytest.approx(beta0 * 0.9 * 0.9 + 1)
    assert tracker.beliefs["a"].last is None


def test_select_never_draws_prompts_without_an_offline_value():
    tracker = _tracker()
    rng = random.Random(0)
    keys = ["x", "a", "y", "b", "c"]
    for _ in range(50):
        chosen = tracker.select(keys, 3, rng)
        assert sorted(keys[i] for i in chosen) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        tracker.select(keys, 4, rng)


def test_thompson_weights_draw_from_the_posterior():
    tracker = _tracker(prompt_sampling={"weights": "thompson"})
    picks = [tracker.select(["a", "b", "c"], 1, random.Random(seed))[0] for seed in range(300)]
    assert set(picks) == {0, 1, 2}
    # a sits near 0.39 (weight ~0.54), b and c near 0.06 / 0.94 (~0.28): a is drawn most.
    assert picks.count(0) > max(picks.count(1), picks.count(2))


def test_state_round_trips_exactly_through_json():
    tracker = _tracker()
    samples = [stored_sample([7, 8], [9], [-0.1234567]), stored_sample([7], [1, 2, 3], [-3.0, 0.0, -1e-7], [(1, 2)])]
    tracker.observe(["a", "b"], [1.0, 0.0], samples, None)
    state = json.loads(json.dumps(tracker.state_dict()))
    restored = PromptValueTracker(SingleStream())
    restored.load_state_dict(state)
    assert restored.state_dict() == tracker.state_dict()
    for key, belief in tracker.beliefs.items():
        other = restored.beliefs[key]
        assert (other.alpha, other.beta, other.visits) == (belief.alpha, belief.beta, belief.visits)
        if belief.last is not None:
            assert other.last.logprobs == belief.last.logprobs
            assert other.last.response_token_ids == belief.last.response_token_ids
            assert other.last.tool_spans == belief.last.tool_spans


def test_save_and_load_a_checkpoint(tmp_path):
    tracker = _tracker()
    tracker.save(tmp_path)
    restored = PromptValueTracker(SingleStream())
    restored.load(tmp_path)
    assert restored.state_dict() == tracker.state_dict()
    with pytest.raises(FileNotFoundError, match="not written by a single_stream run"):
        PromptValueTracker(SingleStream()).load(tmp_path / "missing")
