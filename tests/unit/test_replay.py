"""The training-set assembly of SPO-tree: the edge replay buffer and episode-count fitting."""

from __future__ import annotations

import random

from spo_cli.episode import Episode
from spo_cli.estimate.tree.replay import EdgeReplayBuffer
from spo_cli.optimize.episode_count import fit_episode_count


def edge(i: int, question: str) -> Episode:
    return Episode(
        id=f"e{i}", group_id=f"g-{question}", prompt="p", response="r", prompt_token_ids=[1], response_token_ids=[2],
        finish_reason="stop", metadata={"tree": {"question": question, "node": str(i), "parent": "", "leaf": True}},
    )  # fmt: skip


def test_fit_episode_count():
    rng = random.Random(0)
    items = list(range(10))
    subset = fit_episode_count(items, 4, rng)
    assert len(subset) == 4 and len(set(subset)) == 4 and set(subset) <= set(items)
    # 3 items to 7: repeated ceil(7/3) = 3 times (9), shuffled, cut to 7, so each appears 1-3 times.
    filled = fit_episode_count([0, 1, 2], 7, rng)
    assert len(filled) == 7 and all(1 <= filled.count(i) <= 3 for i in range(3))
    assert fit_episode_count([], 5, rng) == []
    assert sorted(fit_episode_count(items, 10, rng)) == items


def test_replay_caps_per_question_and_keeps_the_rest():
    buffer = EdgeReplayBuffer(max_age=7, edges_per_question=2)
    buffer.add([edge(i, "a") for i in range(5)] + [edge(5, "b")], iteration=1)
    drawn = buffer.draw(1, random.Random(0))
    assert sorted(ep.metadata["tree"]["question"] for ep in drawn) == ["a", "a", "b"]
    assert len(buffer) == 3  # three "a" edges wait for the next iteration
    again = buffer.draw(2, random.Random(0))
    assert len(again) == 2 and not {ep.id for ep in again} & {ep.id for ep in drawn}


def test_replay_drops_edges_older_than_max_age():
    buffer = EdgeReplayBuffer(max_age=7, edges_per_question=1)
    buffer.add([edge(0, "a"), edge(1, "a")], iteration=1)
    buffer.draw(1, random.Random(0))
    # Iteration 9: the edge from iteration 1 is 8 iterations old (the reference drops now - added >= 8).
    assert buffer.draw(9, random.Random(0)) == [] and len(buffer) == 0
    buffer.add([edge(2, "a"), edge(3, "a")], iteration=10)
    buffer.draw(10, random.Random(0))
    assert len(buffer.draw(17, random.Random(0))) == 1  # 7 iterations old: still drawn


def test_replay_state_round_trip():
    buffer = EdgeReplayBuffer(max_age=7, edges_per_question=1)
    buffer.add([edge(0, "a"), edge(1, "a")], iteration=3)
    restored = EdgeReplayBuffer(max_age=7, edges_per_question=1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.entries == buffer.entries
    assert [e.id for e in restored.draw(4, random.Random(1))] == [e.id for e in buffer.draw(4, random.Random(1))]
