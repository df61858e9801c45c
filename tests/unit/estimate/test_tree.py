"""SPO-tree: node values, edge advantages and tree expansion, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from spo_cli.episode import Episode, Segment
from spo_cli.estimate import estimate_advantages, tree_edge_advantages, tree_values
from spo_cli.estimate.tree.growth import TreeRoot, estimate_mc_tree, expand_trees
from spo_cli.recipe import Arith, McTree
from spo_cli.sample import Completion, SamplingParams, new_token_budgets
from spo_cli.tasks import build_task


def tree(edges: dict[str, list[str]]) -> dict[str, list[str]]:
    return edges


def test_all_children_equal_gives_no_edges():
    children = {"": ["0", "1", "2"]}
    values = tree_values(children, {"0": 1.0, "1": 1.0, "2": 1.0})
    assert values == {"": 1.0, "0": 1.0, "1": 1.0, "2": 1.0}
    assert tree_edge_advantages(children, values) == {"0": 0.0, "1": 0.0, "2": 0.0}


def test_early_eos_at_depth_1_weighs_as_much_as_a_subtree():
    # "0" stopped at depth 1 with reward 1; "1" was expanded into three leaves 0, 0, 1.
    # V(1) = 1/3; V(root) = mean(1, 1/3) = 2/3 (a mean over the 4 leaves would be 1/2).
    children = {"": ["0", "1"], "1": ["1.0", "1.1", "1.2"]}
    values = tree_values(children, {"0": 1.0, "1.0": 0.0, "1.1": 0.0, "1.2": 1.0})
    assert values[""] == pytest.approx(2 / 3) and values["1"] == pytest.approx(1 / 3)
    adv = tree_edge_advantages(children, values)
    assert adv["0"] == pytest.approx(1 / 3) and adv["1"] == pytest.approx(-1 / 3)
    assert adv["1.0"] == pytest.approx(-1 / 3) and adv["1.2"] == pytest.approx(2 / 3)


def test_early_eos_at_depth_2():
    # Depth-2 leaves "0.0" (reward 0) and "1.0" (reward 1) stop early; the others run to depth 3.
    # V(0.1) = 1, V(0) = (0 + 1)/2 = 1/2; V(1.1) = (0 + 1)/2 = 1/2, V(1) = (1 + 1/2)/2 = 3/4;
    # V(root) = (1/2 + 3/4)/2 = 5/8. All values are multiples of 1/8, so every difference is exact.
    children = {"": ["0", "1"], "0": ["0.0", "0.1"], "0.1": ["0.1.0", "0.1.1"], "1": ["1.0", "1.1"], "1.1": ["1.1.0", "1.1.1"]}
    rewards = {"0.0": 0.0, "0.1.0": 1.0, "0.1.1": 1.0, "1.0": 1.0, "1.1.0": 0.0, "1.1.1": 1.0}
    values = tree_values(children, rewards)
    assert values == {
        "": 0.625, "0": 0.5, "1": 0.75, "0.0": 0.0, "0.1": 1.0, "1.0": 1.0, "1.1": 0.5,
        "0.1.0": 1.0, "0.1.1": 1.0, "1.1.0": 0.0, "1.1.1": 1.0,
    }  # fmt: skip
    assert tree_edge_advantages(children, values) == {
        "0": -0.125, "1": 0.125, "0.0": -0.5, "0.1": 0.5, "0.1.0": 0.0, "0.1.1": 0.0,
        "1.0": 0.25, "1.1": -0.25, "1.1.0": -0.5, "1.1.1": 0.5,
    }  # fmt: skip


def test_branch_factor_one_has_no_edges():
    children = {"": ["0"], "0": ["0.0"], "0.0": ["0.0.0"]}
    values = tree_values(children, {"0.0.0": 1.0})
    assert set(values.values()) == {1.0}
    assert set(tree_edge_advantages(children, values).values()) == {0.0}


def test_values_of_one_third_and_one_tenth_are_exact():
    # Two subtrees of value 1/3 under one root: both edges must be exactly 0, not a rounding residue.
    children = {"": ["0", "1"], "0": ["0.0", "0.1", "0.2"], "1": ["1.0", "1.1", "1.2"]}
    rewards = {"0.0": 1.0, "0.1": 0.0, "0.2": 0.0, "1.0": 0.0, "1.1": 0.0, "1.2": 1.0}
    values = tree_values(children, rewards)
    assert values[""] == values["0"] == values["1"] == 1 / 3
    adv = tree_edge_advantages(children, values)
    assert adv["0"] == 0.0 and adv["1"] == 0.0
    # A float mean of three 0.1 rewards is 0.10000000000000002, which the exact != 0 filter would keep.
    assert (0.1 + 0.1 + 0.1) / 3 != 0.1
    flat = {"": ["0", "1", "2"]}
    values = tree_values(flat, {"0": 0.1, "1": 0.1, "2": 0.1})
    assert values[""] == 0.1
    assert set(tree_edge_advantages(flat, values).values()) == {0.0}


def test_std_normalized_advantages():
    # Children 1 and 0: V(root) = 1/2, population std 1/2, A = +-(1/2) / (1/2 + eps).
    children = {"": ["0", "1"]}
    values = tree_values(children, {"0": 1.0, "1": 0.0})
    adv = tree_edge_advantages(children, values, normalize_std=True, eps=1e-8)
    assert adv["0"] == pytest.approx(1.0) and adv["1"] == pytest.approx(-1.0)


def test_malformed_trees_are_rejected():
    with pytest.raises(ValueError, match="no leaf reward"):
        tree_values({"": ["0"]}, {})
    with pytest.raises(ValueError, match="not a tree"):
        tree_values({"": ["0", "1"], "0": ["1"]}, {"1": 1.0})


# ------------------------------------------------------------------------------------------ expansion


class ScriptedSampler:
    """A deterministic Sampler: the completions of a prefix are given by `script(prefix_text, i)`.

    It records every call, so tests can check the batching and the token budgets.
    """

    def __init__(self, tokenizer, script):
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[tuple[int, int, int | None, int]] = []  # (n, max_new_tokens, max_total_tokens, prompts)

    def encode_prompts(self, prompts):
        return [self.tokenizer(p)["input_ids"] for p in prompts]

    def generate(self, prompts, params, seed):
        return self.generate_ids(self.encode_prompts(prompts), params, seed)

    def generate_ids(self, prompt_ids, params, seed):
        self.calls.append((params.n, params.max_new_tokens, params.max_total_tokens, len(prompt_ids)))
        out = []
        for ids, budget in zip(prompt_ids, new_token_budgets(prompt_ids, params)):
            prefix = self.tokenizer.decode(ids)
            group = []
            for i in range(params.n):
                text, reason = self.script(prefix, i)
                tokens = self.tokenizer(text)["input_ids"]
                assert len(tokens) <= budget, (text, budget)
                group.append(Completion(list(ids), tokens, text, reason, [-0.5] * len(tokens), [1.0] * len(tokens)))
            out.append(group)
        return out


@pytest.fixture(scope="module")
def tokenizer():
    from spo_cli.models import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def task():
    task = build_task(Arith(), 4)
    yield task
    task.close()


def run_tree(tokenizer, task, script, branching, segment_tokens=8, last_tokens=12, context=None):
    sampler = ScriptedSampler(tokenizer, script)
    prompt = "Q?"
    root = TreeRoot("t0", "q0", prompt, tuple(tokenizer(prompt)["input_ids"]), "5")
    params = SamplingParams(max_new_tokens=last_tokens, max_total_tokens=context)
    nodes, stats = expand_trees(
        [root], sampler, tokenizer, task, branching=branching, segment_tokens=segment_tokens,
        params=params, seed=0, iteration=1,
    )  # fmt: skip
    return sampler, {ep.metadata["tree"]["node"]: ep for ep in nodes}, stats


def test_expansion_leaves_and_grading(tokenizer, task):
    # Depth 1 (8 tokens): child 0 stops with the right answer; child 1 uses all 8 tokens and goes on.
    # Depth 2 (last level, 12 tokens): "1.0" stops and is graded on prompt + both segments (answer
    # "4\nACD": 0). "1.1" is cut by the budget and graded on its own segment only ("#### 5": 1); on the
    # whole text it would have two "####" and score -2.
    def script(prefix, i):
        if prefix == "Q?":
            return ("#### 5", "stop") if i == 0 else ("#### 4\nA", "length")
        return ("CD", "stop") if i == 0 else ("xxxxx\n#### 5", "length")

    sampler, nodes, stats = run_tree(tokenizer, task, script, [2, 2])
    assert set(nodes) == {"0", "1", "1.0", "1.1"}
    assert [c[:2] for c in sampler.calls] == [(2, 8), (2, 12)]  # one call per level: (n, budget)
    assert nodes["0"].reward == 1.0 and nodes["0"].metadata["tree"]["leaf"]
    assert nodes["1"].reward is None and not nodes["1"].metadata["tree"]["leaf"]
    assert nodes["1.0"].reward == 0.0
    assert nodes["1.1"].reward == 1.0 and nodes["1.1"].finish_reason == "length"
    # The child's query is the parent's full text; its tokens are the parent's exact token ids.
    assert nodes["1.0"].prompt == "Q?#### 4\nA" and nodes["1.0"].response == "CD"
    assert nodes["1.0"].prompt_token_ids == tokenizer("Q?#### 4\nA")["input_ids"]
    assert stats["tree/nodes"] == 4 and stats["tree/leaves"] == 3 and stats["tree/truncated_leaves"] == 1

    # V(1) = (0 + 1)/2, V(root) = (1 + 1/2)/2 = 3/4: edges 0: +1/4, 1: -1/4, 1.0: -1/2, 1.1: +1/2.
    from spo_cli.partition import partition_episodes
    from spo_cli.recipe import Whole

    parted = partition_episodes(list(nodes.values()), Whole(), tokenizer)
    edges, metrics = estimate_advantages(parted, McTree(branching=[2, 2]))
    got = {ep.metadata["tree"]["node"]: ep for ep in edges}
    assert {n: ep.segments[0].advantage for n, ep in got.items()} == {"0": 0.25, "1": -0.25, "1.0": -0.5, "1.1": 0.5}
    assert got["1.0"].segments[0].value == 0.5 and got["1.0"].metadata["tree"]["value"] == 0.0
    assert metrics["tree/root_value"] == 0.75 and metrics["tree/edges_kept"] == 4


def test_expansion_respects_the_context(tokenizer, task):
    # The prompt has 2 tokens and the context 12: level 1 gets min(8, 12 - 2) = 8 tokens, level 2
    # min(12, 12 - 10) = 2 (the sampler asserts each request's cap); prompt + path never exceed 12.
    def script(prefix, i):
        return ("AAAAAAAA", "length") if prefix == "Q?" else ("##", "length")

    sampler, nodes, _ = run_tree(tokenizer, task, script, [1, 1, 1], context=12)
    assert [(c[1], c[2]) for c in sampler.calls] == [(8, 12), (8, 12)]
    assert len(nodes["0.0"].prompt_token_ids) + len(nodes["0.0"].response_token_ids) == 12
    # With no room left, "0.0" is not expanded: it is a leaf graded on its own segment, like a cut last level.
    assert set(nodes) == {"0", "0.0"} and nodes["0.0"].metadata["tree"]["leaf"] and nodes["0.0"].reward == 0.0
    # A prompt that fills the context is refused, not turned into an empty tree.
    with pytest.raises(ValueError, match="no room"):
        run_tree(tokenizer, task, script, [1, 1], context=2)


def test_identical_siblings_are_expanded_once(tokenizer, task):
    # Both root children sample "AB" (length): their prefixes are equal, so level 2 samples one prefix.
    def script(prefix, i):
        return ("AB", "length") if prefix == "Q?" else ("#### 5" if i == 0 else "#### 4", "stop")

    sampler, nodes, stats = run_tree(tokenizer, task, script, [2, 2])
    assert [c[3] for c in sampler.calls] == [1, 1]
    assert len(nodes) == 6 and stats["tree/expansions"] == 2


def test_estimate_mc_tree_drops_zero_and_empty_edges():
    def node(name, parent, reward, tokens=(7,), leaf=True):
        return Episode(
            id=f"t-{name}", group_id="t", prompt="p", response="r", prompt_token_ids=[1],
            response_token_ids=list(tokens), response_logprobs=[-1.0] * len(tokens), finish_reason="stop",
            reward=reward, segments=[Segment(start=0, end=len(tokens))] if tokens else [],
            metadata={"tree": {"node": name, "parent": parent, "depth": name.count(".") + 1, "leaf": leaf, "question": "q"}},
        )  # fmt: skip

    # Children 1, 1, 0 (the last with an empty segment): V = 2/3; edges +1/3, +1/3 kept, -2/3 dropped (empty).
    edges, metrics = estimate_mc_tree([node("0", "", 1.0), node("1", "", 1.0), node("2", "", 0.0, tokens=())])
    assert [ep.id for ep in edges] == ["t-0", "t-1"]
    assert edges[0].segments[0].advantage == pytest.approx(1 / 3)
    assert metrics["tree/edges"] == 3 and metrics["tree/edges_kept"] == 2
    with pytest.raises(ValueError, match="not a tree node"):
        estimate_mc_tree([node("0", "", 1.0).model_copy(update={"metadata": {}})])
    with pytest.raises(ValueError, match="do not descend from the root"):
        estimate_mc_tree([node("0", "", 1.0), node("5.0", "5", 1.0)])
