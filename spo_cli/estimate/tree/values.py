"""SPO-tree's pure math: node values from leaf rewards, and edge advantages (docs/algorithms.md#spo-tree).

Values are computed with exact rational arithmetic. The reference keeps an edge iff its advantage is
exactly non-zero; with float means, siblings of equal value can leave a 1e-17 residue (0.1 + 0.1 + 0.1
!= 0.3) and a spurious training example. With fractions, equal values give an advantage of exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction


def _exact_values(
    children: Mapping[str, Sequence[str]], leaf_rewards: Mapping[str, float], root: str
) -> dict[str, Fraction]:
    values: dict[str, Fraction] = {}
    # Iterative post-order: trees from long chains of single children must not hit the recursion limit.
    stack: list[tuple[str, bool]] = [(root, False)]
    on_path: set[str] = set()
    while stack:
        node, expanded = stack.pop()
        kids = children.get(node, ())
        if not kids:
            if node not in leaf_rewards:
                raise ValueError(f"node {node!r} has no children and no leaf reward")
            values[node] = Fraction(leaf_rewards[node])
            continue
        if expanded:
            on_path.discard(node)
            values[node] = sum((values[k] for k in kids), Fraction(0)) / len(kids)
            continue
        if node in on_path:
            raise ValueError(f"node {node!r} is its own descendant: `children` is not a tree")
        on_path.add(node)
        stack.append((node, True))
        for kid in kids:
            if kid in values or kid in on_path:
                raise ValueError(f"node {kid!r} has two parents or is its own ancestor: `children` is not a tree")
            stack.append((kid, False))
    return values


def tree_values(
    children: Mapping[str, Sequence[str]], leaf_rewards: Mapping[str, float], root: str = ""
) -> dict[str, float]:
    """Value of every node reachable from `root`: a leaf's reward, else the unweighted mean of its children's values.

    Args:
        children: node id -> its child ids, in order. A node with no entry (or an empty list) is a leaf.
        leaf_rewards: leaf id -> its reward. Entries for internal nodes are ignored.
        root: id of the root (the prompt).

    Returns:
        node id -> value, for the root and all its descendants. An early-stopped leaf weighs as much as a
        whole sibling subtree (the reference's np.mean over children, not a mean over leaves).

    Example: children {"": ["a", "b"], "a": ["a0", "a1", "a2"]}, rewards {"a0": 1, "a1": 0, "a2": 0, "b": 1}
    gives V(a) = 1/3, V(b) = 1, V("") = 2/3.
    """
    return {node: float(v) for node, v in _exact_values(children, leaf_rewards, root).items()}


def tree_edge_advantages(
    children: Mapping[str, Sequence[str]],
    values: Mapping[str, float],
    normalize_std: bool = False,
    eps: float = 1e-8,
) -> dict[str, float]:
    """Advantage of every edge, keyed by the child: V(child) - V(parent).

    V(parent) is the mean of its children's values including this child (the reference's "rloo" is
    not leave-one-out). With `normalize_std`, each advantage is divided by the population std of the
    siblings' values plus `eps` (the reference's adv_method="grpo").

    Args:
        children: node id -> child ids, as for `tree_values`.
        values: node id -> value (from `tree_values`).

    Returns:
        child id -> advantage, for every node that has a parent in `children`.
    """
    out: dict[str, float] = {}
    for parent, kids in children.items():
        if not kids:
            continue
        parent_value = Fraction(values[parent])
        std = 0.0
        if normalize_std:
            kid_values = [Fraction(values[k]) for k in kids]
            mean = sum(kid_values, Fraction(0)) / len(kid_values)
            std = math.sqrt(float(sum(((v - mean) ** 2 for v in kid_values), Fraction(0)) / len(kid_values)))
        for kid in kids:
            advantage = float(Fraction(values[kid]) - parent_value)
            out[kid] = advantage / (std + eps) if normalize_std else advantage
    return out
