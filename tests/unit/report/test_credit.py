"""The credit-assignment view: token pieces, colours, which episodes are shown and what a response renders to."""

from __future__ import annotations

import math

from spo_cli.episode import Episode, Segment
from spo_cli.models import build_byte_tokenizer
from spo_cli.report.credit import advantage_color, credit_section, episode_html, pick_episodes, token_pieces


def _episode(i: int, text: str, reward: float, advantages: list[float], cuts: list[int], probs: list[float]) -> Episode:
    tok = build_byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bounds = [0, *cuts, len(ids)]
    segments = [Segment(start=a, end=b, advantage=adv) for a, b, adv in zip(bounds, bounds[1:], advantages)]
    return Episode(
        id=f"e{i}", group_id="g", prompt="Q?", response=text, gold="7", prompt_token_ids=[1], response_token_ids=ids,
        response_logprobs=[math.log(p) for p in probs], finish_reason="stop", reward=reward, segments=segments,
    )  # fmt: skip


def test_token_pieces_concatenate_to_the_text_even_across_split_characters():
    tok = build_byte_tokenizer()
    text = "x = 7 × 3 — ünïcode ✓\n#### 21"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids)


def test_advantage_color():
    assert advantage_color(0.0, 1.0) == ""
    assert advantage_color(1.0, 2.0) == "background: rgba(0, 150, 60, 0.475);"  # 0.1 + 0.75 * 0.5
    assert advantage_color(-4.0, 2.0) == "background: rgba(210, 40, 40, 0.850);"  # capped at full strength


def test_pick_episodes_prefers_nonzero_advantages_and_alternates_correct_and_wrong():
    eps = [
        _episode(0, "ab", 1.0, [0.0], [], [1, 1]),
        _episode(1, "cd", 1.0, [0.5], [], [1, 1]),
        _episode(2, "ef", 0.0, [-0.5], [], [1, 1]),
        _episode(3, "gh", 1.0, [0.2], [], [1, 1]),
        _episode(4, "ij", 0.0, [0.0], [], [1, 1]),
    ]
    assert [ep.id for ep in pick_episodes(eps, 3)] == ["e1", "e2", "e3"]
    assert [ep.id for ep in pick_episodes(eps, 10)] == ["e1", "e2", "e3", "e4", "e0"]


def test_episode_html_marks_segments_low_probability_and_advantage_sign():
    ep = _episode(0, "a<b", 1.0, [0.5, -0.25], [1], [0.99, 0.3, 0.95])
    out = episode_html(ep, build_byte_tokenizer(), scale=0.5, low_prob=0.5)
    assert out.count('class="cut"') == 1  # one boundary, before token 1
    assert out.count('class="tok low"') == 1 and "p=0.300" in out
    assert "&lt;" in out and "<b" not in out  # response text is escaped
    assert out.count("rgba(0, 150, 60") == 1 and out.count("rgba(210, 40, 40") == 2
    page = credit_section("run", [ep], build_byte_tokenizer(), 0.5)
    assert "advantage +0.50" in page


def test_the_first_wrong_token_is_boxed_and_named():
    ep = _episode(0, "6*7=42", 0.0, [-0.5], [], [0.9] * 6).model_copy(update={"first_error": 2})
    out = episode_html(ep, build_byte_tokenizer(), scale=0.5, low_prob=0.5)
    assert out.count("tok err") == 1 and ">7</span>" in out.split("tok err")[1][:200]
    assert "first wrong token 2" in out  # in the response's header line
    right = episode_html(_episode(1, "6*6=36", 1.0, [0.5], [], [0.9] * 6), build_byte_tokenizer(), 0.5, 0.5)
    assert "tok err" not in right and "first wrong token" not in right
