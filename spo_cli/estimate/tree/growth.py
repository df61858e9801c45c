"""SPO-tree (docs/algorithms.md#spo-tree): grow a tree of segments per prompt, then turn its edges into episodes.

`expand_trees` is the sampling side: it grows every tree level by level, all nodes of one depth across
all prompts in one sampler call (the sampler prefills each distinct prefix once and shares it among the
node's children), and returns one node episode per non-root node. `estimate_mc_tree` is the estimate
stage: node values and edge advantages from those episodes (`spo_cli.estimate.tree.values`), keeping the edges
with a non-zero advantage as training episodes.

A node episode is a normal `Episode`: prompt = the parent's full text (prompt + the segments above it),
response = the node's own segment, and `metadata["tree"]` places it in its tree. Prefixes are exact
token ids (the reference re-tokenizes concatenated strings, which can merge tokens across a boundary).

With a tool loop (docs/tools.md#every-method) a segment may call tools: its budget counts the policy's tokens, a tool
output is appended whole (so no level starts inside one) and marked in the node's `tool_spans`, and the calls made
above a node count against `max_tool_calls` in its expansions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spo_cli.episode import Episode
from spo_cli.estimate.tree.values import tree_edge_advantages, tree_values
from spo_cli.recipe import McTree
from spo_cli.sample import Sampler, SamplingParams
from spo_cli.tasks import Task
from spo_cli.seeding import derive_seed

ROOT = ""


@dataclass(frozen=True)
class TreeRoot:
    """A prompt to grow a tree from."""

    group_id: str  # the tree's id: its node episodes share it as group_id
    question_id: str  # the problem, across iterations (the replay buffer caps edges per question)
    prompt: str
    prompt_token_ids: tuple[int, ...]
    gold: str | None


@dataclass
class _Node:
    tree: int
    node: str
    parent: str
    depth: int
    prefix_ids: tuple[int, ...]  # prompt + every segment down to and including this node's
    segment_ids: list[int]
    text: str
    logprobs: list[float] | None
    entropies: list[float] | None
    finish_reason: str
    query_text: str  # the parent's full text: the prompt + the segments above this node
    tool_spans: list[tuple[int, int]] = field(default_factory=list)  # in segment_ids
    tool_calls: list[str] = field(default_factory=list)  # this segment's calls' statuses
    calls_above: int = 0  # tool calls made by the path from the root down to and including this node
    leaf: bool = False
    graded_text: str | None = None  # what the leaf's reward is computed on
    reward: float | None = None


def child_id(parent: str, index: int) -> str:
    return f"{parent}.{index}" if parent else str(index)


def level_budget(depth: int, branching: Sequence[int], segment_tokens: int, last_level_tokens: int) -> int:
    """New-token budget of the children of a depth-`depth` node (before the context cap)."""
    return last_level_tokens if depth == len(branching) - 1 else segment_tokens


def grow_trees(
    questions: Sequence[tuple[str, str, str | None]],
    sampler: Sampler,
    tokenizer,
    task: Task,
    spec: McTree,
    params: SamplingParams,
    *,
    seed: int,
    iteration: int,
) -> tuple[list[Episode], dict[str, float]]:
    """One tree per (question id, formatted prompt, gold) with the recipe's tree settings: `expand_trees`
    on roots whose tree ids are `it<iteration>-<question id>` (as the training loop names its groups)."""
    prompt_ids = sampler.encode_prompts([prompt for _, prompt, _ in questions])
    roots = [
        TreeRoot(f"it{iteration}-{qid}", qid, prompt, tuple(ids), gold)
        for (qid, prompt, gold), ids in zip(questions, prompt_ids)
    ]
    return expand_trees(
        roots, sampler, tokenizer, task, branching=spec.branching, segment_tokens=spec.segment_tokens,
        params=params, seed=seed, iteration=iteration,
    )  # fmt: skip


def expand_trees(
    roots: Sequence[TreeRoot],
    sampler: Sampler,
    tokenizer,
    task: Task,
    *,
    branching: Sequence[int],
    segment_tokens: int,
    params: SamplingParams,
    seed: int,
    iteration: int,
) -> tuple[list[Episode], dict[str, float]]:
    """Grow one tree per root; return its node episodes (every node but the root) and counts.

    `params` holds the sampling settings; its `max_new_tokens` is the last level's budget and its
    `max_total_tokens` the context that caps every request at min(budget, context - prefix tokens).
    A child that stops (EOS or a stop string) is a leaf graded on prompt + all its segments; a child cut
    by its budget is expanded further, except at the last level, where it is a leaf graded on its own
    segment only (as the reference does). A node left with no room in the context is graded the same way.
    Every level draws from a seed derived from (`seed`, iteration, depth).
    """
    nodes: list[_Node] = []
    generated = expansions = 0
    frontier = [
        _Node(k, ROOT, ROOT, 0, tuple(r.prompt_token_ids), [], "", None, None, "length", "") for k, r in enumerate(roots)
    ]
    for depth, n_children in enumerate(branching):
        budget = level_budget(depth, branching, segment_tokens, params.max_new_tokens)
        expandable = []
        for node in frontier:
            room = None if params.max_total_tokens is None else params.max_total_tokens - len(node.prefix_ids)
            # A root without room is an over-long prompt: the sampler refuses it with a clear error.
            if room is not None and room < 1 and node.node != ROOT:
                _make_truncated_leaf(node)
            else:
                expandable.append(node)
        # Identical prefixes (siblings that sampled the same segment) are expanded once; with one seed per
        # level the reference's per-node requests would sample them identically too.
        unique = list(dict.fromkeys(node.prefix_ids for node in expandable))
        if not unique:
            break
        level_params = replace(params, n=n_children, max_new_tokens=budget, logprobs=True, tool_tokens_in_budget=False)
        level_seed = derive_seed(seed, "mc_tree", iteration, depth)
        calls = {node.prefix_ids: node.calls_above for node in expandable}
        if any(calls.values()):  # only a tool loop's segments make calls
            groups = sampler.generate_ids(unique, level_params, level_seed, calls_made=[calls[p] for p in unique])
        else:
            groups = sampler.generate_ids(unique, level_params, seed=level_seed)
        children_of = dict(zip(unique, groups))
        generated += sum(len(c.token_ids) for group in groups for c in group)
        expansions += len(unique)
        last_level = depth == len(branching) - 1
        frontier = []
        for node in expandable:
            children = _children(node, roots[node.tree], children_of[node.prefix_ids], depth, last_level, tokenizer)
            nodes.extend(children)
            frontier.extend(child for child in children if not child.leaf)
    leaves = [n for n in nodes if n.leaf]
    rewards = task.grade([n.graded_text for n in leaves], [roots[n.tree].gold for n in leaves]) if leaves else []
    for leaf, reward in zip(leaves, rewards):
        leaf.reward = float(reward)
    episodes = [_node_episode(n, roots[n.tree], iteration) for n in nodes]
    early = sum(1 for n in leaves if n.finish_reason == "stop")
    return episodes, {
        "tree/nodes": float(len(nodes)),
        "tree/leaves": float(len(leaves)),
        "tree/early_leaves": float(early),
        "tree/truncated_leaves": float(len(leaves) - early),
        "tree/expansions": float(expansions),  # distinct prefixes sampled from (identical siblings share one)
        "tree/generated_tokens": float(generated),
    }


def _children(node: _Node, root: TreeRoot, completions, depth: int, last_level: bool, tokenizer) -> list[_Node]:
    """The children of `node` from its sampled segments: a child that stopped is a leaf graded on the whole
    response, one cut by its budget at the last level a truncated leaf, any other is expanded further."""
    query_text = root.prompt + _response_text(tokenizer, node.prefix_ids[len(root.prompt_token_ids) :])
    children = []
    for i, c in enumerate(completions):
        child = _Node(
            node.tree,
            child_id(node.node, i),
            node.node,
            depth + 1,
            node.prefix_ids + tuple(c.token_ids),
            list(c.token_ids),
            c.text,
            list(c.logprobs) if c.logprobs else None,
            list(c.entropies) if c.entropies else None,
            c.finish_reason,
            query_text,
            list(c.tool_spans),
            list(c.tool_calls),
            node.calls_above + len(c.tool_calls),
        )
        children.append(child)
        if c.finish_reason == "stop":
            child.leaf = True
            child.graded_text = root.prompt + _response_text(tokenizer, child.prefix_ids[len(root.prompt_token_ids) :])
        elif last_level:
            _make_truncated_leaf(child)
    return children


def _make_truncated_leaf(node: _Node) -> None:
    node.leaf = True
    node.graded_text = node.text


def _response_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True) if ids else ""


def _node_episode(node: _Node, root: TreeRoot, iteration: int) -> Episode:
    parent_ids = node.prefix_ids[: len(node.prefix_ids) - len(node.segment_ids)]
    return Episode(
        id=f"{root.group_id}-n{node.node}",
        group_id=root.group_id,
        iteration=iteration,
        prompt=node.query_text,
        response=node.text,
        gold=root.gold,
        prompt_token_ids=list(parent_ids),
        response_token_ids=node.segment_ids,
        response_logprobs=node.logprobs if node.segment_ids else [],
        response_entropies=node.entropies if node.segment_ids else [],
        finish_reason=node.finish_reason,
        tool_spans=node.tool_spans,
        reward=node.reward,
        metadata={
            "tree": {
                "question": root.question_id,
                "node": node.node,
                "parent": node.parent,
                "depth": node.depth,
                "leaf": node.leaf,
            }
        }
        | ({"tool_calls": node.tool_calls} if node.tool_calls else {}),
    )


def estimate_mc_tree(
    episodes: Sequence[Episode], normalize_std: bool = False, eps: float = 1e-8
) -> tuple[list[Episode], dict[str, float]]:
    """Edge episodes with a non-zero advantage, from the partitioned node episodes of whole trees.

    Each kept episode has the constant advantage V(node) - V(parent) on every token, `Segment.value` =
    V(parent) (the state before the segment) and `metadata["tree"]["value"]` = V(node). Edges with an
    advantage of exactly 0 (all siblings alike, a single child) or an empty segment are dropped; they
    still count in their parent's value.
    """
    trees: dict[str, list[Episode]] = {}
    for ep in episodes:
        if not isinstance(ep.metadata.get("tree"), dict):
            raise ValueError(
                f"episode {ep.id} is not a tree node (no metadata.tree): estimator mc_tree reads the node episodes "
                "that tree expansion writes"
            )
        if ep.segments is None:
            raise ValueError(f"episode {ep.id} has no segments: run the partition stage first")
        trees.setdefault(ep.group_id, []).append(ep)
    kept: list[Episode] = []
    root_values: list[float] = []
    edges = 0
    for tree_id, members in trees.items():
        children: dict[str, list[str]] = {}
        leaf_rewards: dict[str, float] = {}
        by_node: dict[str, Episode] = {}
        for ep in members:
            info = ep.metadata["tree"]
            node, parent = str(info["node"]), str(info["parent"])
            if node in by_node:
                raise ValueError(f"tree {tree_id}: node {node!r} appears twice")
            by_node[node] = ep
            children.setdefault(parent, []).append(node)
            if info.get("leaf"):
                if ep.reward is None:
                    raise ValueError(f"episode {ep.id} is a leaf without a reward")
                leaf_rewards[node] = ep.reward
        try:
            values = tree_values(children, leaf_rewards, ROOT)
        except ValueError as exc:
            raise ValueError(f"tree {tree_id}: {exc}") from None
        orphans = sorted(set(by_node) - set(values))
        if orphans:
            raise ValueError(f"tree {tree_id}: nodes {orphans[:5]} do not descend from the root (a parent is missing)")
        advantages = tree_edge_advantages(children, values, normalize_std, eps)
        root_values.append(values[ROOT])
        for node, ep in by_node.items():
            edges += 1
            advantage = advantages[node]
            if advantage == 0.0 or not ep.response_token_ids:
                continue
            parent_value = values[str(ep.metadata["tree"]["parent"])]
            segments = [s.model_copy(update={"advantage": advantage, "value": parent_value}) for s in ep.segments]
            metadata: dict[str, Any] = {**ep.metadata, "tree": {**ep.metadata["tree"], "value": values[node]}}
            kept.append(ep.model_copy(update={"segments": segments, "token_advantages": None, "metadata": metadata}))
    metrics = {
        "tree/edges": float(edges),
        "tree/edges_kept": float(len(kept)),
        "tree/frac_zero_advantage": 1.0 - len(kept) / edges if edges else 0.0,
        "tree/root_value": sum(root_values) / len(root_values) if root_values else 0.0,
    }
    return kept, metrics
