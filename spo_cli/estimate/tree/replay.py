"""SPO-tree's edge replay buffer (the reference's OnPolicyReplayBuffer).

An explicit object drawing from an explicit RNG; its content is saved in every checkpoint (`state_dict`), so a
resumed run trains on exactly the edges an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spo_cli.episode import Episode

REPLAY_FILE = "replay.json"


def question_of(episode: Episode) -> str:
    tree = episode.metadata.get("tree")
    return str(tree["question"]) if isinstance(tree, dict) and "question" in tree else episode.group_id


class EdgeReplayBuffer:
    """SPO-tree's on-policy replay buffer (the reference's OnPolicyReplayBuffer).

    Each iteration: the new edges are added, edges added more than `max_age` iterations ago are dropped,
    then up to `edges_per_question` edges per question are drawn at random and removed; the rest stay for
    later iterations, where they train with their (stale) sampling-time log-probs as pi_old.
    """

    def __init__(self, max_age: int, edges_per_question: int):
        self.max_age = max_age
        self.edges_per_question = edges_per_question
        self.entries: list[tuple[int, Episode]] = []  # (iteration added, edge)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, edges: Sequence[Episode], iteration: int) -> None:
        self.entries.extend((iteration, ep) for ep in edges)

    def draw(self, iteration: int, rng: random.Random) -> list[Episode]:
        self.entries = [(added, ep) for added, ep in self.entries if iteration - added <= self.max_age]
        by_question: dict[str, list[int]] = {}
        for i, (_, ep) in enumerate(self.entries):
            by_question.setdefault(question_of(ep), []).append(i)
        drawn: list[int] = []
        for indices in by_question.values():
            if len(indices) > self.edges_per_question:
                indices = rng.sample(indices, self.edges_per_question)
            drawn.extend(indices)
        taken = set(drawn)
        out = [self.entries[i][1] for i in drawn]
        self.entries = [entry for i, entry in enumerate(self.entries) if i not in taken]
        return out

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"added": added, "episode": ep.model_dump(mode="json")} for added, ep in self.entries]

    def load_state_dict(self, state: Sequence[dict[str, Any]]) -> None:
        self.entries = [(int(row["added"]), Episode.model_validate(row["episode"])) for row in state]

    def save(self, checkpoint_dir: Path) -> None:
        """Write the buffer into a checkpoint directory (before the checkpoint is published)."""
        (checkpoint_dir / REPLAY_FILE).write_text(json.dumps(self.state_dict()))

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the buffer a checkpoint holds (an empty one if the checkpoint has none)."""
        path = checkpoint_dir / REPLAY_FILE
        self.load_state_dict(json.loads(path.read_text()) if path.is_file() else [])
