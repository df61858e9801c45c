"""The credit-assignment view (the paper's Figure 12): responses with every token coloured by its advantage,
segment boundaries drawn and low-probability tokens marked, as a self-contained HTML fragment.

Tokens a tool wrote (`Episode.tool_spans`) are drawn apart, in a grey box labelled with the call's status: they are
not trained and their advantages and log-probabilities are placeholders, so they get no colour, no low-probability
mark and no segment bar. The code block the policy wrote before each output is outlined as the tool call when the
recipe's markers are found in the text right before it."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from spo_cli.episode import Episode, policy_token_mask, token_advantages
from spo_cli.tools.calls import ToolMarkers

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
.tool-out { display: block; margin: 0.3em 0; padding: 0.1em 0.6em; border: 1px solid #999; border-radius: 4px;
  background: #f0f0f0; color: #444; }
.tool-out::before, .tool-call::before { content: attr(data-label); font-family: system-ui, sans-serif;
  font-size: 0.75em; color: #666; }
.tool-out::before { display: block; }
.tool-call::before { margin-right: 0.4em; }
.tool-failed { border-color: #c22; }
.tool-failed::before { color: #c22; }
.tool-call { outline: 1px dashed #888; outline-offset: 2px; }
.tool-key { border: 1px solid #999; border-radius: 4px; background: #f0f0f0; }
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


def episode_html(ep: Episode, tokenizer, scale: float, low_prob: float, markers: ToolMarkers | None = None) -> str:
    """One response as HTML spans: colour = token advantage, underline = p < low_prob, bar = a segment start; tool
    outputs in boxes of their own, tool calls outlined (see `tool_call_ranges` for `markers`)."""
    pieces = token_pieces(tokenizer, ep.response_token_ids)
    advantages = token_advantages(ep)
    logprobs = ep.response_logprobs or [None] * len(pieces)
    written_by_policy = policy_token_mask(ep)
    starts = {s.start: k for k, s in enumerate(ep.segments or []) if s.start > 0}
    segment_of = [0] * len(pieces)
    for k, seg in enumerate(ep.segments or []):
        segment_of[seg.start : seg.end] = [k] * (seg.end - seg.start)
    tokens = []  # one string per token, its segment bar included, so tool blocks can wrap token ranges
    for i, piece in enumerate(pieces):
        if not written_by_policy[i]:
            tokens.append(_tool_token_html(i, piece, i == ep.first_error))
            continue
        bar = '<span class="cut"></span>' if i in starts else ""
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
        tokens.append(f'{bar}<span class="{classes}"{style} title="{html.escape(tip)}">{html.escape(piece)}</span>')
    calls = tool_call_ranges(pieces, ep.tool_spans, markers or ToolMarkers())
    body = with_tool_blocks(tokens, ep.tool_spans, calls, span_statuses(ep))
    seg_adv = ", ".join(f"{s.advantage:+.2f}" for s in ep.segments or [])
    meta = (
        f"reward {ep.reward:g}" if ep.reward is not None else "no reward"
    ) + f" · gold {html.escape(str(ep.gold))} · {len(pieces)} tokens · {len(ep.segments or [])} segments ({seg_adv}) · {ep.finish_reason}"
    meta += tool_summary(ep)
    if ep.first_error is not None:
        meta += f" · first wrong token {ep.first_error}"
    return (
        '<div class="episode">'
        f'<div class="meta">{meta}</div>'
        f'<details><summary>prompt</summary><div class="prompt">{html.escape(ep.prompt)}</div></details>'
        f'<div class="response">{body}</div>'
        "</div>"
    )


def _tool_token_html(i: int, piece: str, first_error: bool) -> str:
    """A token a tool wrote: no colour, no low-probability mark (its advantage and log-probability are placeholders),
    boxed if it is where a wrong response first went wrong (ground truth, whoever wrote the token)."""
    tip = f"token {i}: {piece!r}  written by the tool, not trained" + ("  first wrong token" if first_error else "")
    classes = "tok tool err" if first_error else "tok tool"
    return f'<span class="{classes}" title="{html.escape(tip)}">{html.escape(piece)}</span>'


def tool_statuses(ep: Episode) -> list[str] | None:
    """Each tool call's status, in order, as the tool loop stored them in `metadata["tool_calls"]` (ok, error,
    timeout, ...); None when the episode does not say (metadata is free-form: records from elsewhere may lack it)."""
    statuses = ep.metadata.get("tool_calls")
    if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
        return None
    return statuses


def span_statuses(ep: Episode) -> list[str | None]:
    """The status of the call behind each tool span, None where unknown.

    The loop records a status for every call but a span only for an output with room left in the response, which
    can only be the last call (the response ends there); so call k wrote span k. Counts that fit no such pairing
    (a record from elsewhere) pair nothing rather than label an output with another call's status."""
    statuses = tool_statuses(ep)
    spans = len(ep.tool_spans)
    if statuses is None or len(statuses) not in (spans, spans + 1):
        return [None] * spans
    return list(statuses[:spans])


def tool_summary(ep: Episode) -> str:
    """The header's " · N tool calls (F failed: statuses)" part, "" for an episode without calls."""
    statuses = tool_statuses(ep)
    calls = len(statuses) if statuses else len(ep.tool_spans)
    if not calls:
        return ""
    out = f" · {calls} tool call{'s' if calls != 1 else ''}"
    if statuses:
        # "Failed" as the sampling metrics count it (tools/failure_frequency): any status but ok.
        failed = [s for s in statuses if s != "ok"]
        kinds = ", ".join(sorted(set(failed)))
        out += f" ({len(failed)} failed: {html.escape(kinds)})" if failed else " (all ok)"
    return out


def tool_call_ranges(
    pieces: Sequence[str], tool_spans: Sequence[tuple[int, int]], markers: ToolMarkers
) -> list[tuple[int, int] | None]:
    """For each tool span, the [start, end) tokens of the code block that called it, None where it is not found.

    The loop stops generation at the token that completes `markers.code_end` and appends the output right after,
    so a call is recognised only when `code_end` ends within the last policy token before the span and a
    `code_start` precedes it after the previous output. Anything else (other markers than `markers`, a block
    opened in the prompt) leaves the call unmarked rather than outlining a guess.
    """
    ranges: list[tuple[int, int] | None] = []
    previous = 0
    for start, end in tool_spans:
        ranges.append(_call_range(pieces, previous, start, markers))
        previous = end
    return ranges


def _call_range(pieces: Sequence[str], first: int, stop: int, markers: ToolMarkers) -> tuple[int, int] | None:
    """The tokens in [first, stop) from the last `code_start` to a `code_end` that the token before `stop` completes."""
    if stop <= first:
        return None
    offsets = [0]  # character offset of each token's piece within the policy text [first, stop)
    for piece in pieces[first:stop]:
        offsets.append(offsets[-1] + len(piece))
    text = "".join(pieces[first:stop])
    close = text.rfind(markers.code_end)
    if close < 0 or close + len(markers.code_end) <= offsets[-2]:
        return None
    open_ = text.rfind(markers.code_start, 0, close)
    if open_ < 0:
        return None
    # The first token whose piece reaches past the marker's first character opens the call.
    begin = next(k for k in range(stop - first) if offsets[k + 1] > open_)
    return first + begin, stop


def with_tool_blocks(
    tokens: Sequence[str],
    tool_spans: Sequence[tuple[int, int]],
    calls: Sequence[tuple[int, int] | None],
    statuses: Sequence[str | None],
) -> str:
    """The tokens' HTML joined, each tool span's tokens in a "tool output" box and each call's in a "tool call"
    outline; without tool spans exactly the tokens joined."""
    out = []
    position = 0
    for (start, end), call, status in zip(tool_spans, calls, statuses):
        if call is not None:
            out += tokens[position : call[0]]
            out.append(f'<span class="tool-call" data-label="tool call">{"".join(tokens[call[0] : call[1]])}</span>')
            position = call[1]
        out += tokens[position:start]
        label = "tool output" + (f" · {status}" if status is not None else "")
        classes = "tool-out tool-failed" if status not in (None, "ok") else "tool-out"
        out.append(f'<span class="{classes}" data-label="{html.escape(label)}">{"".join(tokens[start:end])}</span>')
        position = end
    out += tokens[position:]
    return "".join(out)


def credit_section(
    title: str, episodes: Sequence[Episode], tokenizer, low_prob: float, markers: ToolMarkers | None = None
) -> str:
    """A heading, a legend and the episodes; colours share one scale (the largest |advantage| of a policy token
    shown: a tool token's is a placeholder). `markers`: the run's tool-call markers (default ReTool's)."""
    scale = max(
        (abs(a) for ep in episodes for a, mine in zip(token_advantages(ep), policy_token_mask(ep)) if mine), default=0.0
    )
    legend = (
        '<div class="legend meta">'
        f'<span style="{advantage_color(scale, scale)}">advantage +{scale:.2f}</span>'
        f'<span style="{advantage_color(-scale, scale)}">advantage -{scale:.2f}</span>'
        f'<span class="low">p &lt; {low_prob:g}</span>'
        '<span><span class="cut"></span> segment start</span><span class="tok err">first wrong token</span>'
        + _tool_legend(episodes)
        + " (hover a token for its numbers)</div>"
    )
    body = (
        "".join(episode_html(ep, tokenizer, scale, low_prob, markers) for ep in episodes)
        or "<p>no episodes with advantages</p>"
    )
    return f"<h2>{html.escape(title)}</h2>{legend}{body}"


def _tool_legend(episodes: Sequence[Episode]) -> str:
    """Legend keys for tool calls and outputs, "" when no episode shown has a tool output (the legend as before)."""
    if not any(ep.tool_spans for ep in episodes):
        return ""
    return (
        '<span class="tool-call" data-label="tool call">code</span>'
        '<span class="tool-key">tool output (not trained)</span>'
    )
