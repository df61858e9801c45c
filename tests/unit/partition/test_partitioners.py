"""Partitioners (segment boundaries) checked against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from spo_cli.partition.cutpoint import cutpoint_boundaries
from spo_cli.partition.entropy import entropy_boundaries, linear_quantile
from spo_cli.partition.fixed_count import fixed_count_boundaries
from spo_cli.partition.fixed_tokens import fixed_tokens_boundaries
from spo_cli.partition.spans import segments_from_boundaries
from spo_cli.partition.step import step_boundaries, step_char_starts

LOW = math.log(0.5)  # p = 0.5 < 0.9: a cutpoint candidate
HIGH = math.log(0.99)  # p = 0.99 >= 0.9: never a candidate


# ---------------------------------------------------------------- cutpoints


def test_cutpoints_none_when_every_token_is_confident():
    assert cutpoint_boundaries([HIGH] * 6) == []
    assert cutpoint_boundaries([]) == []


def test_cutpoints_all_tokens_low_probability():
    # K = [0..6]; interval 3 keeps ranks 0, 3, 6.
    assert cutpoint_boundaries([LOW] * 7, interval=3) == [0, 3, 6]


def test_cutpoints_single_token():
    assert cutpoint_boundaries([LOW]) == [0]
    assert cutpoint_boundaries([HIGH]) == []


def test_cutpoints_first_token_low_opens_at_zero():
    # K = [0, 3]: boundary 0 means the prompt state is estimated (reference cutpoint -1).
    assert cutpoint_boundaries([LOW, HIGH, HIGH, LOW], interval=1) == [0, 3]


def test_cutpoints_last_token_low():
    assert cutpoint_boundaries([HIGH, HIGH, HIGH, HIGH, LOW], interval=1) == [4]


def test_cutpoints_probability_exactly_at_threshold_is_not_a_candidate():
    # log then exp round-trips 0.5 exactly in float64, so the comparison 0.5 < 0.5 is decided, not noise.
    assert math.exp(math.log(0.5)) == 0.5
    logprobs = [math.log(0.5), math.log(0.25), math.log(0.5), math.log(0.25)]
    assert cutpoint_boundaries(logprobs, rho=0.5, interval=1) == [1, 3]


def test_cutpoints_interval_larger_than_candidate_count_keeps_the_first():
    # K = [1, 3, 4]; interval 5 keeps rank 0 only.
    assert cutpoint_boundaries([HIGH, LOW, HIGH, LOW, LOW, HIGH], interval=5) == [1]


def test_cutpoints_interval_one_keeps_every_candidate():
    assert cutpoint_boundaries([HIGH, LOW, HIGH, LOW, LOW, HIGH], interval=1) == [1, 3, 4]


def test_cutpoints_interval_counts_ranks_not_positions():
    # K = [1, 3, 4, 7, 8]; interval 2 keeps ranks 0, 2, 4 -> tokens 1, 4, 8.
    logprobs = [HIGH, LOW, HIGH, LOW, LOW, HIGH, HIGH, LOW, LOW]
    assert cutpoint_boundaries(logprobs, interval=2) == [1, 4, 8]


def test_cutpoints_default_rho_and_interval():
    # rho 0.9: p = 0.89 qualifies, p = 0.91 does not; interval 5 keeps ranks 0 and 5.
    logprobs = [math.log(0.91)] + [math.log(0.89)] * 7
    assert cutpoint_boundaries(logprobs) == [1, 6]


@pytest.mark.parametrize("kwargs", [{"rho": 0.0}, {"rho": 1.5}, {"rho": -0.1}, {"interval": 0}])
def test_cutpoints_reject_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        cutpoint_boundaries([LOW], **kwargs)


# ---------------------------------------------------------------- fixed count


def test_fixed_count_not_divisible_longer_parts_first():
    # divmod(10, 4) = (2, 2): parts of 3, 3, 2, 2 tokens start at 0, 3, 6, 8.
    assert fixed_count_boundaries(10, 4) == [3, 6, 8]
    # divmod(5, 4) = (1, 1): parts 2, 1, 1, 1 start at 0, 2, 3, 4.
    assert fixed_count_boundaries(5, 4) == [2, 3, 4]


def test_fixed_count_divisible():
    assert fixed_count_boundaries(8, 4) == [2, 4, 6]


def test_fixed_count_shorter_than_the_number_of_parts_skips_empty_parts():
    # divmod(3, 4) = (0, 3): parts 1, 1, 1, 0; the empty fourth part would start at 3 = L.
    assert fixed_count_boundaries(3, 4) == [1, 2]
    assert fixed_count_boundaries(1, 4) == []


def test_fixed_count_edges():
    assert fixed_count_boundaries(0, 4) == []
    assert fixed_count_boundaries(7, 1) == []
    with pytest.raises(ValueError):
        fixed_count_boundaries(5, 0)
    with pytest.raises(ValueError):
        fixed_count_boundaries(-1, 4)


# ---------------------------------------------------------------- fixed tokens


def test_fixed_tokens_length_a_multiple_of_the_segment():
    assert fixed_tokens_boundaries(12, 4) == [0, 4, 8]


def test_fixed_tokens_length_not_a_multiple_leaves_a_short_last_segment():
    # Segments [0,4), [4,8), [8,10).
    assert fixed_tokens_boundaries(10, 4) == [0, 4, 8]
    assert fixed_tokens_boundaries(9, 4) == [0, 4, 8]


def test_fixed_tokens_edges():
    assert fixed_tokens_boundaries(0, 4) == []
    assert fixed_tokens_boundaries(3, 5) == [0]
    assert fixed_tokens_boundaries(3, 1) == [0, 1, 2]
    with pytest.raises(ValueError):
        fixed_tokens_boundaries(3, 0)
    with pytest.raises(ValueError):
        fixed_tokens_boundaries(-2, 4)


# ---------------------------------------------------------------- steps: characters


def test_step_chars_gsm8k_answer_is_merged_into_the_last_step():
    # Steps "a=1" and "\nb=2\n#### 3": the newline opens the second step.
    assert step_char_starts("a=1\nb=2\n#### 3") == [0, 3]


def test_step_chars_leading_newlines_join_the_first_step():
    # "\n\na=1" is step 0; "\nb=2" starts at the newline at index 5.
    assert step_char_starts("\n\na=1\nb=2") == [0, 5]


def test_step_chars_middle_empty_line_joins_the_following_step():
    # Steps "a" and "\n\nb" (the reference would also make the empty line "\n" a step).
    assert step_char_starts("a\n\nb") == [0, 1]
    # A line of spaces is blank too: steps "a" and "\n  \nb".
    assert step_char_starts("a\n  \nb") == [0, 1]


def test_step_chars_without_answer_marker_split_every_line():
    assert step_char_starts("a\nb\nc") == [0, 1, 3]
    # A trailing newline has no following step, so it stays with "b".
    assert step_char_starts("a\nb\n") == [0, 1]


def test_step_chars_only_after_the_first_answer_marker():
    # Everything from the first "\n#### " on belongs to the last step, newlines included.
    assert step_char_starts("a\nb\n#### 1\nc\n#### 2") == [0, 1]
    # Blank lines before the marker stay with the last non-blank step.
    assert step_char_starts("a\nb\n\n#### 3") == [0, 1]


def test_step_chars_degenerate_texts():
    assert step_char_starts("") == []
    assert step_char_starts("\n\n") == [0]
    assert step_char_starts("\n#### 5") == [0]
    assert step_char_starts("single line") == [0]


# ---------------------------------------------------------------- steps: tokens


def prefix_chars_of(pieces: list[str]):
    """prefix_chars for a tokenisation whose tokens decode to `pieces`, counting calls."""
    calls: list[int] = []

    def prefix_chars(t: int) -> int:
        calls.append(t)
        return len("".join(pieces[:t]))

    return prefix_chars, calls


def test_step_tokens_each_step_opens_at_a_token():
    # Token starts (chars): "a"0 "=1"1 "\nb"3 "=2"5 "\n####"7 " 3"12; step 1 starts at char 3 -> token 2.
    pieces = ["a", "=1", "\nb", "=2", "\n####", " 3"]
    text = "".join(pieces)
    prefix_chars, _ = prefix_chars_of(pieces)
    assert step_boundaries(step_char_starts(text), prefix_chars, len(pieces)) == [0, 2]


def test_step_tokens_a_token_crossing_a_step_start_stays_in_its_first_step():
    # "=1\nb" starts at char 1 (step 0) and crosses step 1's start (char 3); step 1 opens at "=2" (char 5).
    pieces = ["a", "=1\nb", "=2"]
    prefix_chars, _ = prefix_chars_of(pieces)
    assert step_boundaries([0, 3], prefix_chars, 3) == [0, 2]


def test_step_tokens_two_step_starts_inside_one_token_collapse():
    # Text "a\nb\nc\nd", steps at chars 0, 1, 3, 5. Token "\nb\nc" (chars 1-4) opens step 1 and
    # contains step 2's start (char 3); steps 2 and 3 both map to token 2 ("\nd", char 5).
    pieces = ["a", "\nb\nc", "\nd"]
    prefix_chars, _ = prefix_chars_of(pieces)
    assert step_char_starts("".join(pieces)) == [0, 1, 3, 5]
    assert step_boundaries([0, 1, 3, 5], prefix_chars, 3) == [0, 1, 2]


def test_step_tokens_a_step_starting_inside_the_last_token_gets_no_boundary():
    # Step 2 starts at char 3, inside the last token "\nb\nc" (chars 1-4).
    pieces = ["a", "\nb\nc"]
    prefix_chars, _ = prefix_chars_of(pieces)
    assert step_boundaries([0, 1, 3], prefix_chars, 2) == [0, 1]


def test_step_tokens_edges():
    prefix_chars, _ = prefix_chars_of(["ab", "c"])
    assert step_boundaries([0, 1], prefix_chars, 0) == []
    # Tokens that decode to nothing (no steps: step_char_starts("") == []) still form one segment.
    empty_chars, _ = prefix_chars_of(["", ""])
    assert step_boundaries([], empty_chars, 2) == [0]
    with pytest.raises(ValueError):
        step_boundaries([0, 2, 2], prefix_chars, 2)
    with pytest.raises(ValueError):
        step_boundaries([-1, 2], prefix_chars, 2)


def test_step_tokens_binary_search_calls_prefix_chars_logarithmically():
    # 1024 one-character tokens: each of 4 searches probes at most ceil(log2(1024)) + 1 = 11 points.
    pieces = ["x"] * 1024
    prefix_chars, calls = prefix_chars_of(pieces)
    assert step_boundaries([0, 100, 500, 1000], prefix_chars, 1024) == [0, 100, 500, 1000]
    assert len(calls) <= 4 * 11
    assert len(calls) == len(set(calls))  # memoised: no token prefix is decoded twice


# ---------------------------------------------------------------- entropy

# The worked example of docs/algorithms.md#segment-gae-worked-example (boundaries, batch scope).
SEQ_A = [0.1, 2.0, 0.2, 0.1, 1.5, 0.3, 0.1, 0.05]
SEQ_B = [0.4, 0.1, 0.1, 2.5, 0.2, 0.1]


def test_quantile_of_the_worked_example():
    # 14 sorted values: 0.05, 0.1 x6, 0.2 x2, 0.3, 0.4, 1.5, 2.0, 2.5.
    both = SEQ_A + SEQ_B
    assert linear_quantile(both, 0.8) == pytest.approx(0.84, abs=1e-12)  # h = 10.4: 0.4 + 0.4 * 1.1
    assert linear_quantile(both, 0.95) == pytest.approx(2.175, abs=1e-12)  # h = 12.35: 2.0 + 0.35 * 0.5
    assert linear_quantile(SEQ_A, 0.8) == pytest.approx(1.02, abs=1e-12)  # h = 5.6: 0.3 + 0.6 * 1.2
    assert linear_quantile(SEQ_B, 0.8) == 0.4  # h = 4.0 lands on a sample: exact


def test_quantile_edges():
    assert linear_quantile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert linear_quantile([3.0, 1.0, 2.0], 1.0) == 3.0
    assert linear_quantile([7.0], 0.3) == 7.0
    assert linear_quantile([0.0, 1.0], 0.25) == 0.25
    with pytest.raises(ValueError):
        linear_quantile([], 0.5)
    with pytest.raises(ValueError):
        linear_quantile([1.0], 1.5)


def test_quantile_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    rng = random.Random(0)
    for _ in range(300):
        values = [rng.choice([rng.random() * 3, 0.25, 0.5, 2.0]) for _ in range(rng.randint(1, 40))]
        q = 1.0 - rng.choice([rng.random(), 0.05, 0.2, 0.5, 1.0])
        expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
        assert linear_quantile(values, q) == expected, (values, q)


def test_entropy_worked_example_batch_02():
    # tau = 0.84: A at t=1 (2.0), 4 (1.5); B at t=3 (2.5). Segments A [0,0],[1,3],[4,7]; B [0,2],[3,5].
    bounds = entropy_boundaries([SEQ_A, SEQ_B], percentile=0.2, scope="batch")
    assert bounds == [[0, 1, 4], [0, 3]]
    assert [(s, e) for s, e, _ in segments_from_boundaries(bounds[0], 8)] == [(0, 1), (1, 4), (4, 8)]
    assert [(s, e) for s, e, _ in segments_from_boundaries(bounds[1], 6)] == [(0, 3), (3, 6)]


def test_entropy_worked_example_batch_default_005():
    # tau = 2.175: only B's 2.5 qualifies; A is a single segment.
    assert entropy_boundaries([SEQ_A, SEQ_B]) == [[0], [0, 3]]


def test_entropy_worked_example_sequence_02():
    # tau_A = 1.02 -> t=1, 4; tau_B = 0.40 -> t=0 (a tie, already the start) and t=3.
    assert entropy_boundaries([SEQ_A, SEQ_B], percentile=0.2, scope="sequence") == [[0, 1, 4], [0, 3]]


def test_entropy_scope_changes_the_threshold():
    # Sequence scope at 0.05: tau_A = 1.5 + 0.65 * 0.5 = 1.825 -> t=1 (2.0) now qualifies in A.
    assert entropy_boundaries([SEQ_A, SEQ_B], percentile=0.05, scope="sequence") == [[0, 1], [0, 3]]


def test_entropy_ties_at_tau_are_boundaries():
    # sorted [0, 1, 1, 1], h = 1.5 -> tau = 1.0: all three 1.0 tokens qualify (75 % > 50 %).
    assert entropy_boundaries([[0.0, 1.0, 1.0, 1.0]], percentile=0.5) == [[0, 1, 2, 3]]
    # sorted [1, 2, 3], h = 1.0 -> tau = 2.0 exactly; the 2.0 at t=2 is kept.
    assert entropy_boundaries([[3.0, 1.0, 2.0]], percentile=0.5) == [[0, 2]]


def test_entropy_position_zero_always_starts_and_is_not_repeated():
    # sorted [0, 0, 5], h = 1.6 -> tau = 3.0: only t=0 reaches it, and 0 is the start anyway.
    assert entropy_boundaries([[5.0, 0.0, 0.0]], percentile=0.2) == [[0]]
    # percentile 1.0: tau = min, every token is a boundary.
    assert entropy_boundaries([[3.0, 1.0, 2.0]], percentile=1.0) == [[0, 1, 2]]


def test_entropy_min_segment_length_compares_with_the_last_kept_boundary():
    # sorted [0,0,0,9,9,9], h = 2.5 -> tau = 4.5: candidates 1, 2, 4. With min 2: 1 is dropped
    # (1 - 0 < 2); 2 is kept (2 - 0 = 2, measured from the kept 0, not the dropped 1); 4 is kept.
    assert entropy_boundaries([[0.0, 9.0, 9.0, 0.0, 9.0, 0.0]], percentile=0.5, min_segment_length=2) == [[0, 2, 4]]
    # Worked example with min 2 -> A drops t=1; with min 4 -> B drops t=3 as well.
    assert entropy_boundaries([SEQ_A, SEQ_B], 0.2, min_segment_length=2) == [[0, 4], [0, 3]]
    assert entropy_boundaries([SEQ_A, SEQ_B], 0.2, min_segment_length=4) == [[0, 4], [0]]


def test_entropy_max_segments_keeps_the_highest_entropy_boundaries():
    # A's boundaries 1 (H=2.0) and 4 (H=1.5): two segments keep t=1, one keeps only 0.
    assert entropy_boundaries([SEQ_A, SEQ_B], 0.2, max_segments=2) == [[0, 1], [0, 3]]
    assert entropy_boundaries([SEQ_A, SEQ_B], 0.2, max_segments=1) == [[0], [0]]
    assert entropy_boundaries([SEQ_A, SEQ_B], 0.2, max_segments=3) == [[0, 1, 4], [0, 3]]
    # The later t=3 (H=3) beats the earlier t=1 (H=1): sorted [0,0,0,1,3], h = 2.4 -> tau = 0.4.
    assert entropy_boundaries([[0.0, 1.0, 0.0, 3.0, 0.0]], 0.4, max_segments=2) == [[0, 3]]
    # Equal entropies: the earlier token wins.
    assert entropy_boundaries([[0.0, 5.0, 0.0, 5.0, 0.0]], 0.4, max_segments=2) == [[0, 1]]


def test_entropy_min_length_applies_before_max_segments():
    # min 2 drops A's t=1 first, so max_segments=2 keeps t=4. The other order would keep t=1
    # (higher entropy) and then drop it for being too close to 0, leaving [0].
    assert entropy_boundaries([SEQ_A], 0.2, min_segment_length=2, max_segments=2) == [[0, 4]]


def test_entropy_empty_sequences():
    assert entropy_boundaries([]) == []
    assert entropy_boundaries([[], []]) == [[], []]
    assert entropy_boundaries([[], []], scope="sequence") == [[], []]
    # An empty sequence adds nothing to the batch quantile: same result as without it.
    assert entropy_boundaries([SEQ_A, [], SEQ_B], 0.2) == [[0, 1, 4], [], [0, 3]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percentile": 0.0},
        {"percentile": 1.5},
        {"scope": "global"},
        {"min_segment_length": 0},
        {"max_segments": 0},
    ],
)
def test_entropy_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        entropy_boundaries([SEQ_A], **kwargs)


def test_entropy_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        entropy_boundaries([[0.1, float("nan")]])


# ---------------------------------------------------------------- spans


def test_spans_empty_response():
    assert segments_from_boundaries([], 0) == []


def test_spans_no_boundary_is_one_leading_region():
    assert segments_from_boundaries([], 4) == [(0, 4, False)]


def test_spans_leading_region_before_the_first_boundary():
    assert segments_from_boundaries([2], 5) == [(0, 2, False), (2, 5, True)]
    assert segments_from_boundaries([1, 3], 5) == [(0, 1, False), (1, 3, True), (3, 5, True)]
    assert segments_from_boundaries([4], 5) == [(0, 4, False), (4, 5, True)]


def test_spans_boundary_at_zero_has_no_leading_region():
    assert segments_from_boundaries([0, 3], 5) == [(0, 3, True), (3, 5, True)]
    assert segments_from_boundaries([0], 1) == [(0, 1, True)]


@pytest.mark.parametrize(
    ("boundaries", "length"),
    [([3, 3], 5), ([3, 1], 5), ([5], 5), ([-1], 5), ([0], 0), ([], -1)],
)
def test_spans_reject_invalid_boundaries(boundaries, length):
    with pytest.raises(ValueError):
        segments_from_boundaries(boundaries, length)


@pytest.mark.parametrize(
    "boundaries,tool_spans,length,expected",
    [
        ([0, 4, 7], [(3, 6)], 9, [0, 6, 7]),  # 4 is inside the output: moved to 6
        ([2, 3], [(1, 4)], 9, [4]),  # both move to 4: one boundary
        ([5], [(4, 9)], 9, []),  # the output ends the response: no policy token to open a segment
        ([0, 3, 6], [(3, 6)], 9, [0, 6]),  # a boundary at the output's end stays where it is
        ([1, 8], [(2, 4), (6, 8)], 9, [1, 8]),  # outside every span: unchanged
    ],
)
def test_boundaries_move_out_of_tool_outputs(boundaries, tool_spans, length, expected):
    from spo_cli.partition.spans import off_tool_spans

    assert off_tool_spans(boundaries, tool_spans, length) == expected


def test_no_partitioner_opens_a_segment_inside_a_tool_output():
    from spo_cli.episode import Episode
    from spo_cli.partition import partition_episodes
    from spo_cli.recipe import FixedTokens

    episode = Episode(id="e", group_id="g", prompt="p", response="r", prompt_token_ids=[1],
                      response_token_ids=list(range(10)), response_logprobs=[-1.0] * 10, finish_reason="stop",
                      tool_spans=[(2, 7)])  # fmt: skip
    (parted,) = partition_episodes([episode], FixedTokens(segment_tokens=3))
    # fixed 3-token segments would start at 0, 3, 6, 9: 3 and 6 fall in the tool's output and both move to 7
    assert [(s.start, s.end) for s in parted.segments] == [(0, 7), (7, 9), (9, 10)]
