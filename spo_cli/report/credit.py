"""The credit-assignment view (the paper's Figure 12): responses with every token coloured by its advantage,
segment boundaries drawn and low-probability tokens marked, as a self-contained HTML fragment."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from spo_cli.episode import Episode, token_advantages

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1, h2, h3 { font-weight: 600; }
.episode { border: 1px solid #ddd; border-radius: 6px; margin: 1.2em 0; padding: 0.6em 1em; }
.meta { color: #555; font-size: 0.9em; margin-bottom: 0.4em; }
.response { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; line-height: 1.9; }
.prompt { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; color: #555; }
.tok { border-radius: 2px; }
.low { border-bottom: 2px solid #1f4fd1; font-weight: 600; }
.err { outline: 2px solid #111; outline-offset: 1px; }
.cut { display: inline-block; width: 0; height: 1.3em; border-left: 2px solid #111; margin: 0 1px; vertical-align: middle; }
.legend span { padding: 0 0.5em; margin-right: 0.5em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
"""


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded response; the pieces concatenate to the decoded text.

    A token's text depends on its neighbours (byte-level BPE splits a UTF-8 character across tokens), so text is
    decoded incrementally from the last complete character: a token that ends mid-character adds "" and the token
    completing it adds the whole character. Linear in the response length.
    """
    ids = list(token_ids)
    pieces = []
    prefix_offset = read_offset = 0
    for i in range(len(ids)):
        prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
        new_text = tokenizer.decode(ids[prefix_offset : i + 1], skip_special_tokens=False)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            pieces.append(new_text[len(prefix_text) :])
            prefix_offset, read_offset = read_offset, i + 1
        else:
            pieces.append("")
    return pieces


def advantage_color(advantage: float, scale: float) -> str:
    """Green for positive, red for negative advantages, opacity |advantage| / scale (capped at 1); '' for zero."""
    if advantage == 0 or scale <= 0:
        return ""
    alpha = min(1.0, abs(advantage) / scale)
    rgb = "0, 150, 60" if advantage > 0 else "210, 40, 40"
    return f"background: rgba({rgb}, {0.1 + 0.75 * alpha:.3f});"


def pick_episodes(episodes: Sequence[Episode], count: int) -> list[Episode]:
    """Up to `count` episodes with advantages to show: correct and incorrect ones alternately, in file order, those
    with a non-zero advantage first (a GRPO group that is all right or all wrong teaches nothing to look at)."""
    usable = [ep for ep in episodes if ep.segments and all(s.advantage is not None for s in ep.segments)]
    usable = [ep for ep in usable if ep.response_token_ids]
    usable.sort(key=lambda ep: not any(token_advantages(ep)))
    good = [ep for ep in usable if (ep.reward or 0) >= 1.0]
    bad = [ep for ep in usable if (ep.reward or 0) < 1.0]
    out: list[Episode] = []
    while len(out) < count and (good or bad):
        for pool in (good, bad):
            if pool and len(out) < count:
                out.append(pool.pop(0))
    return out


def episode_html(ep: Episode, tokenizer, scale: float, low_prob: float) -> str:
    """One response as HTML spans: colour = token advantage, underline = p < low_prob, bar = a segment start."""
    pieces = token_pieces(tokenizer, ep.response_token_ids)
    advantages = token_advantages(ep)
    logprobs = ep.response_logprobs or [None] * len(pieces)
    starts = {s.start: k for k, s in enumerate(ep.segments or []) if s.start > 0}
    segment_of = [0] * len(pieces)
    for k, seg in enumerate(ep.segments or []):
        segment_of[seg.start : seg.end] = [k] * (seg.end - seg.start)
    spans = []
    for i, piece in enumerate(pieces):
        if i in starts:
            spans.append('<span class="cut"></span>')
        p = math.exp(logprobs[i]) if logprobs[i] is not None else None
        classes = "tok low" if p is not None and p < low_prob else "tok"
        if i == ep.first_error:
            classes += " err"
        seg = ep.segments[segment_of[i]] if ep.segments else None
        tip = f"token {i}: {piece!r}  A={advantages[i]:+.3f}" + ("  first wrong token" if i == ep.first_error else "")
        if p is not None:
            tip += f"  p={p:.3f}"
        if seg is not None:
            tip += f"  segment {segment_of[i] + 1} [{seg.start}, {seg.end})"
            if seg.value is not None:
                tip += f"  V(start)={seg.value:.3f}"
        style = advantage_color(advantages[i], scale)
        style = f' style="{style}"' if style else ""
        spans.append(f'<span class="{classes}"{style} title="{html.escape(tip)}">{html.escape(piece)}</span>')
    seg_adv = ", ".join(f"{s.advantage:+.2f}" for s in ep.segments or [])
    meta = (
        f"reward {ep.reward:g}" if ep.reward is not None else "no reward"
    ) + f" · gold {html.escape(str(ep.gold))} · {len(pieces)} tokens · {len(ep.segments or [])} segments ({seg_adv}) · {ep.finish_reason}"
    if ep.first_error is not None:
        meta += f" · first wrong token {ep.first_error}"
    return (
        '<div class="episode">'
        f'<div class="meta">{meta}</div>'
        f'<details><summary>prompt</summary><div class="prompt">{html.escape(ep.prompt)}</div></details>'
        f'<div class="response">{"".join(spans)}</div>'
        "</div>"
    )


def credit_section(title: str, episodes: Sequence[Episode], tokenizer, low_prob: float) -> str:
    """A heading, a legend and the episodes; colours share one scale (the largest |advantage| shown)."""
    scale = max((abs(a) for ep in episodes for a in token_advantages(ep)), default=0.0)
    legend = (
        '<div class="legend meta">'
        f'<span style="{advantage_color(scale, scale)}">advantage +{scale:.2f}</span>'
        f'<span style="{advantage_color(-scale, scale)}">advantage -{scale:.2f}</span>'
        f'<span class="low">p &lt; {low_prob:g}</span>'
        '<span><span class="cut"></span> segment start</span><span class="tok err">first wrong token</span>'
        " (hover a token for its numbers)</div>"
    )
    body = "".join(episode_html(ep, tokenizer, scale, low_prob) for ep in episodes) or "<p>no episodes with advantages</p>"
    return f"<h2>{html.escape(title)}</h2>{legend}{body}"
