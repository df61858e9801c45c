"""VinePPO's step advantages (docs/algorithms.md#vineppo), checked against values worked out by hand."""

from __future__ import annotations

import pytest

from spo_cli.episode import Episode, Segment, token_advantages
from spo_cli.estimate import estimate_advantages, vineppo_step_advantages
from spo_cli.estimate.vineppo import estimated_step_states
from spo_cli.recipe import Vineppo


def test_every_value_estimated():
    # V = [0.5, 0.25, 0.75], R = 1 on the last step: A = [0.25 - 0.5, 0.75 - 0.25, 1 - 0.75].
    advantages, filled = vineppo_step_advantages([0.5, 0.25, 0.75], 1.0)
    assert advantages == [-0.25, 0.5, 0.25] and filled == [0.5, 0.25, 0.75]


def test_missing_values_are_back_filled_with_the_reward():
    # V_1, V_2 not estimated: V_2 = r_2 + V_3 = 1, V_1 = r_1 + V_2 = 1; A = [1 - 0.5, 0, 1 - 1].
    assert vineppo_step_advantages([0.5, None, None], 1.0) == ([0.5, 0.0, 0.0], [0.5, 1.0, 1.0])
    # A -2 reward (several "####") back-fills the same way.
    assert vineppo_step_advantages([0.25, None], -2.0) == ([-2.25, 0.0], [0.25, -2.0])
    assert vineppo_step_advantages([], 1.0) == ([], [])


def test_number_of_estimated_states():
    # The prompt and after step k for k <= min(n - 2, cap - 1): min(n, cap + 1) states.
    assert estimated_step_states(30, 25) == 26
    assert estimated_step_states(3, 25) == 3
    assert estimated_step_states(1, 25) == 1
    assert estimated_step_states(0, 25) == 0
    assert estimated_step_states(5, 0) == 1  # the prompt only


def test_estimate_vineppo_values_each_step_start_once():
    # Steps [0, 2), [2, 3), [3, 5); V(state) = (prefix length) / 4, a stand-in for rollouts.
    ep = Episode(
        id="e", group_id="g", iteration=2, prompt="p", response="abcde", gold="1",
        prompt_token_ids=[9], response_token_ids=[1, 2, 3, 4, 5], response_logprobs=[-1.0] * 5,
        finish_reason="stop", reward=1.0,
        segments=[Segment(start=0, end=2), Segment(start=2, end=3), Segment(start=3, end=5)],
    )  # fmt: skip
    requested = []

    def state_values(states, iteration):
        requested.extend((iteration, len(s.prefix_token_ids)) for s in states)
        return [len(s.prefix_token_ids) / 4 for s in states]

    # V = [0, 0.5, 0.75]: A = [0.5, 0.25, 1 - 0.75]; the same episode twice is valued once.
    (out, _), stats = estimate_advantages([ep, ep], Vineppo(), state_values)
    assert requested == [(2, 0), (2, 2), (2, 3)] and stats["mc/unique_states"] == 3
    assert token_advantages(out) == [0.5, 0.5, 0.25, 0.25, 0.25]
    assert [s.value for s in out.segments] == [0.0, 0.5, 0.75]
    # With max_estimated_steps = 1 only V_0 and V_1 are sampled; V_2 is back-filled to R = 1.
    requested.clear()
    (out, _), _ = estimate_advantages([ep, ep], Vineppo(max_estimated_steps=1), state_values)
    assert requested == [(2, 0), (2, 2)]
    assert token_advantages(out) == [0.5, 0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="needs the policy"):
        estimate_advantages([ep], Vineppo())


def test_states_carry_the_tool_calls_their_prefix_made():
    # Tool outputs at tokens [1, 3) and [4, 6): the state before token 4 made one call, before token 6 two.
    from spo_cli.estimate.mc_chain import state_before

    ep = Episode(
        id="e", group_id="g", iteration=0, prompt="p", response="abcdefg", gold="1",
        prompt_token_ids=[9], response_token_ids=[1, 2, 3, 4, 5, 6, 7], response_logprobs=[-1.0, 0, 0, -1.0, 0, 0, -1.0],
        finish_reason="stop", reward=1.0, tool_spans=[(1, 3), (4, 6)],
    )  # fmt: skip
    assert [state_before(ep, b).tool_calls for b in (0, 1, 3, 4, 6, 7)] == [0, 0, 1, 1, 2, 2]
    assert state_before(ep, 4).prefix_token_ids == (1, 2, 3, 4) and state_before(ep, 4).prompt_token_ids == (9,)
