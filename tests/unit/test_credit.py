"""Ground-truth credit: where a wrong arithmetic response first departs from the solution, and the credit metrics
that compare a method's advantages with it, on cases worked out by hand."""

from __future__ import annotations

import random

import pytest

from spo_cli.credit import credit_metrics, localizes, misplaced_blame, most_negative_segments, token_at_char
from spo_cli.episode import Segment
from spo_cli.tasks.arith import first_error, make_problem, with_openers

from .test_episode import make_episode

SOLUTION = "6*6=36\n36-17=19\n19*2=38\n#### 38"


# ------------------------------------------------------------------------------------------ first_error


def test_a_right_response_has_no_first_error():
    assert first_error(SOLUTION, SOLUTION) is None
    assert first_error(SOLUTION + "\n", SOLUTION) is None


def test_wrong_from_the_first_step():
    # "6*7=42...": the operand 7 (offset 2) is where it departs; "6*6=35": the 5 of the result (offset 5).
    assert first_error("6*7=42\n42-17=25\n25*2=50\n#### 50", SOLUTION) == 2
    assert first_error("6*6=35\n35-17=18\n18*2=36\n#### 36", SOLUTION) == 5


def test_wrong_only_at_the_last_step():
    wrong = "6*6=36\n36-17=19\n19*2=38\n#### 39"
    assert first_error(wrong, SOLUTION) == len(wrong) - 1  # the 9 of the answer


def test_a_wrong_digit_after_a_right_one_departs_at_the_wrong_digit():
    # "36-17=18": the 1 matches 19's first digit; the 8 is the first wrong character (offset 7 + 8).
    assert first_error("6*6=36\n36-17=18\n18*2=36\n#### 36", SOLUTION) == len("6*6=36\n36-17=1")


def test_a_skipped_step_or_early_answer_departs_where_the_step_was_due():
    assert first_error("6*6=36\n#### 36", SOLUTION) == len("6*6=36\n")
    assert first_error("6*6=36\n19*2=38\n#### 38", SOLUTION) == len("6*6=36\n")


def test_an_unreadable_response_departs_at_its_start():
    assert first_error("banana", SOLUTION) == 0
    assert first_error("", SOLUTION) is None  # nothing in it is wrong: it is only short


def test_a_response_cut_short_is_not_wrong_anywhere():
    assert first_error("6*6=36\n36-1", SOLUTION) is None


def test_first_error_on_generated_problems_points_at_the_changed_character():
    rng = random.Random(0)
    for _ in range(50):
        solution = make_problem(rng, rng.randint(6, 12)).solution
        k = rng.randrange(len(solution))
        changed = solution[:k] + ("X" if solution[k] != "X" else "Y") + solution[k + 1 :]
        assert first_error(changed, solution) == k


# ------------------------------------------------------------------------------ first_error with step openers

OPENERS = ("So ", "Then ", "")


def test_with_openers_opens_every_worked_line_and_not_the_answer():
    opened = with_openers(SOLUTION, OPENERS, random.Random(0))
    lines = opened.split("\n")
    assert [line.removeprefix("So ").removeprefix("Then ") for line in lines[:-1]] == SOLUTION.split("\n")[:-1]
    assert lines[-1] == "#### 38"
    assert with_openers(SOLUTION, (), random.Random(0)) == SOLUTION


def test_any_opener_on_any_line_is_right():
    assert first_error("So 6*6=36\n36-17=19\nThen 19*2=38\n#### 38", SOLUTION, OPENERS) is None
    assert first_error(SOLUTION, SOLUTION, OPENERS) is None  # every line opened by ""


def test_with_openers_wrong_from_the_first_step():
    # "Then 6*7": the 7 is offset 5 + 2.
    assert first_error("Then 6*7=42\n42-17=25\n#### 25", SOLUTION, OPENERS) == 7


def test_with_openers_wrong_only_at_the_last_step():
    wrong = "So 6*6=36\nSo 36-17=19\nSo 19*2=38\n#### 39"
    assert first_error(wrong, SOLUTION, OPENERS) == len(wrong) - 1


def test_an_opener_not_on_the_list_departs_where_it_leaves_every_form():
    # "Sa": "S" is the start of "So "; "a" is where it departs (offset len("6*6=36\n") + 1).
    assert first_error("6*6=36\nSa 36-17=19\n", SOLUTION, OPENERS) == len("6*6=36\n") + 1
    assert first_error("So #### 38", SOLUTION, OPENERS) == len("So ")  # an answer where a step was due


def test_with_openers_unreadable_cut_short_and_trailing_text():
    assert first_error("banana", SOLUTION, OPENERS) == 0
    assert first_error("So 6*6=36\nThe", SOLUTION, OPENERS) is None  # a prefix of "Then ": short, not wrong
    assert first_error(SOLUTION + "\nmore", SOLUTION, OPENERS) == len(SOLUTION)


# -------------------------------------------------------------------------------------- token_at_char


def test_token_at_char_with_multi_character_tokens():
    pieces = ["6*", "6=", "36", "\n", "####", " 38"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = list(range(len(pieces)))
    assert [token_at_char(c, ids, decode) for c in (0, 1, 2, 4, 5, 6, 7, 11, 13)] == [0, 0, 1, 2, 2, 3, 4, 5, 5]
    assert token_at_char(14, ids, decode) is None


# -------------------------------------------------------------------------------------------- metrics


def test_misplaced_blame_by_hand():
    # Negative mass: 1 + 0 + 3 = 4 over tokens 0..3; before token 2 lies 1 of it.
    assert misplaced_blame([-1.0, 0.5, -3.0, 0.0], first_error=2) == pytest.approx(0.25)
    assert misplaced_blame([-1.0, -1.0, -1.0, -1.0], first_error=3) == pytest.approx(0.75)  # uniform: 3 of 4 tokens
    assert misplaced_blame([0.0, 0.0, -2.0], first_error=2) == 0.0  # all on the wrong token: ideal
    assert misplaced_blame([0.2, 0.0], first_error=1) is None  # no blame at all


def test_most_negative_segment_and_localization():
    segments = [(0, 4, -0.1), (4, 9, -0.6), (9, 12, -0.6), (12, 15, 0.3)]
    assert most_negative_segments(segments) == [(4, 9), (9, 12)]  # tied at the lowest: blamed together
    assert most_negative_segments([(0, 3, 0.0), (3, 5, 0.2)]) == []
    assert localizes([(4, 9)], 4) and localizes([(4, 9)], 8) and not localizes([(4, 9)], 9)
    assert localizes([(4, 9), (9, 12)], 9)
    assert localizes([(4, 9)], 1, slack=3) and not localizes([(4, 9)], 0, slack=3)  # starts 3 tokens after the error


def test_credit_metrics_over_episodes():
    seg = lambda start, end, a: Segment(start=start, end=end, advantage=a)  # noqa: E731
    ids = list(range(10))
    common = dict(response_token_ids=ids, response_logprobs=[-0.1] * 10, reward=0.0)
    episodes = [
        # A chain-like assigner: all blame on the segment holding the first error (token 6).
        make_episode(id="a", first_error=6, segments=[seg(0, 6, 0.0), seg(6, 10, -0.5)], **common),
        # Group-like: one advantage everywhere, error at token 2 -> misplaced 2/10.
        make_episode(id="b", first_error=2, segments=[seg(0, 10, -1.0)], **common),
        # One advantage over two segments (a response-level baseline on cutpoint segments): both are blamed, so the
        # error at token 1 is localized and the blamed span is the whole response; misplaced 1/10.
        make_episode(id="e", first_error=1, segments=[seg(0, 4, -0.3), seg(4, 10, -0.3)], **common),
        # Wrong but unblamed (an all-wrong group under GRPO): counted in blamed_share only.
        make_episode(id="c", first_error=4, segments=[seg(0, 10, 0.0)], **common),
        # Right responses and unknown errors do not count.
        make_episode(id="d", segments=[seg(0, 10, 1.0)], **{**common, "reward": 1.0}),
    ]
    out = credit_metrics(episodes)
    assert out == pytest.approx(
        {
            "credit/wrong_responses": 4.0,
            "credit/blamed_share": 3 / 4,
            "credit/misplaced_blame": (0.0 + 0.2 + 0.1) / 3,
            "credit/uniform_blame": (0.6 + 0.2 + 0.1) / 3,
            "credit/localization": 1.0,
            "credit/blamed_span": (0.4 + 1.0 + 1.0) / 3,
        }
    )
    assert credit_metrics(episodes[4:]) == {}  # only the right response


# ------------------------------------------------------------------------------------------ SPO-tree paths


def tree_node(node: str, parent: str, n: int, advantage: float | None, reward=None, path_first_error=None):
    """A node episode of one tree: `n` tokens, its edge's advantage (None: the estimator dropped the edge)."""
    tree = {"question": "q", "node": node, "parent": parent, "depth": len(node), "leaf": reward is not None}
    if path_first_error is not None:
        tree["path_first_error"] = path_first_error
    segments = [Segment(start=0, end=n, advantage=advantage)] if advantage is not None else None
    return make_episode(id=f"t-{node}", group_id="t", response_token_ids=list(range(n)), response_logprobs=[-0.1] * n,
                        reward=reward, segments=segments, metadata={"tree": tree})  # fmt: skip


def test_tree_credit_lays_each_wrong_leaf_out_as_its_root_to_leaf_path():
    # root -> a (3 tokens, +0.5) -> b (2 tokens, -1.0; wrong, first wrong token 3 of the path: b's first)
    #                             -> c (2 tokens, dropped by the estimator; right)
    # root -> d (4 tokens, -0.5; wrong, first wrong token 1)
    nodes = [
        tree_node("a", "", 3, 0.5),
        tree_node("ab", "a", 2, -1.0, reward=0.0, path_first_error=3),
        tree_node("ac", "a", 2, None, reward=1.0),
        tree_node("d", "", 4, -0.5, reward=0.0, path_first_error=1),
    ]
    from spo_cli.credit import estimated_credit, tree_credit_metrics, tree_paths

    assert {leaf: [ep.id for ep in path] for leaf, path in tree_paths(nodes).items()} == {
        "t-ab": ["t-a", "t-ab"], "t-ac": ["t-a", "t-ac"], "t-d": ["t-d"]
    }  # fmt: skip
    estimated = [ep for ep in nodes if ep.segments is not None]
    # Path a-b: advantages [.5 .5 .5 -1 -1], error at 3: no blame before it (0 of 2), uniform 3/5; the most negative
    # segment (b, tokens 3-5) holds it; span 2/5. Path d: [-.5] x 4, error at 1: 0.5 of 2.0 before it = 1/4,
    # uniform 1/4; d holds it; span 1.
    expected = {
        "credit/wrong_responses": 2.0, "credit/blamed_share": 1.0, "credit/misplaced_blame": (0.0 + 0.25) / 2,
        "credit/uniform_blame": (0.6 + 0.25) / 2, "credit/localization": 1.0, "credit/blamed_span": (0.4 + 1.0) / 2,
    }  # fmt: skip
    assert tree_credit_metrics(nodes, estimated) == pytest.approx(expected)
    assert estimated_credit(nodes, estimated) == pytest.approx(expected)  # tree nodes in, path metrics out


def test_tree_credit_without_known_first_errors_is_empty():
    nodes = [tree_node("a", "", 3, 0.5), tree_node("ab", "a", 2, -1.0, reward=0.0)]
    from spo_cli.credit import tree_credit_metrics

    assert tree_credit_metrics(nodes, nodes) == {}
