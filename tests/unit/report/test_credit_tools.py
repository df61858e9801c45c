"""The credit-assignment view of responses that called a tool: outputs boxed apart (no colour, no low-probability
mark, no segment bar), calls outlined, call counts in the header, and responses without tools as before."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

from spo_cli.episode import Episode, Segment
from spo_cli.models import build_byte_tokenizer
from spo_cli.report.credit import credit_section, episode_html, tool_call_ranges, token_pieces
from spo_cli.tools.calls import ToolMarkers, output_block

CALL = "Check.\n<code>\nprint(1 < 2)\n</code>"
OUTPUT = 'True <script>alert("x & \'y\'")</script>\n'
AFTER = "So #### 7"


class _Tokens(HTMLParser):
    """Each token span of a rendered response: index, classes, style, text, and the classes of its ancestors."""

    def __init__(self):
        super().__init__()
        self.stack: list[list[str]] = []
        self.tokens: dict[int, dict] = {}
        self.current: dict | None = None
        self.labels: list[str] = []
        self.bars_in_tool_output = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        ancestors = {c for level in self.stack for c in level}
        if "cut" in classes and "tool-out" in ancestors:
            self.bars_in_tool_output += 1
        if "data-label" in attrs:
            self.labels.append(attrs["data-label"])
        if "tok" in classes:
            index = int(re.match(r"token (\d+):", attrs["title"]).group(1))
            self.current = self.tokens[index] = {
                "classes": set(classes), "style": attrs.get("style"), "text": "", "in": ancestors, "title": attrs["title"],
            }  # fmt: skip
        self.stack.append(classes)

    def handle_endtag(self, tag):
        self.stack.pop()
        self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data


def _parse(out: str) -> _Tokens:
    parser = _Tokens()
    parser.feed(out)
    return parser


def _tool_episode(statuses: list[str] | None = None, call: str = CALL) -> Episode:
    """Policy text `call`, the tool's output block, then more policy text; tool tokens carry low placeholder
    log-probabilities and non-zero advantages, which the view must not show."""
    tok = build_byte_tokenizer()
    parts = [call, output_block(call, OUTPUT, ToolMarkers()), AFTER]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in parts]
    start, end = len(ids[0]), len(ids[0]) + len(ids[1])
    n = end + len(ids[2])
    logprobs = [math.log(0.9)] * n
    logprobs[start:end] = [-5.0] * (end - start)
    advantages = [0.5] * start + [2.0] * (end - start) + [-0.5] * (n - end)
    # The middle segment starts inside the tool output: a record from elsewhere; no bar may be drawn there.
    segments = [Segment(start=0, end=3, advantage=0.5), Segment(start=3, end=start + 2, advantage=0.5),
                Segment(start=start + 2, end=n, advantage=-0.5)]  # fmt: skip
    return Episode(
        id="t0", group_id="g", prompt="Q?", response="".join(parts), gold="7", prompt_token_ids=[1],
        response_token_ids=[i for part in ids for i in part], response_logprobs=logprobs, finish_reason="stop",
        tool_spans=[(start, end)], reward=1.0, segments=segments, token_advantages=advantages,
        metadata={"tool_calls": statuses} if statuses is not None else {},
    )  # fmt: skip


def test_tool_output_tokens_are_boxed_uncoloured_and_never_low_probability():
    ep = _tool_episode(["error"])
    (start, end), n = ep.tool_spans[0], len(ep.response_token_ids)
    out = episode_html(ep, build_byte_tokenizer(), scale=0.5, low_prob=0.5)
    parsed = _parse(out)
    assert sorted(parsed.tokens) == list(range(n))
    for i in range(start, end):
        token = parsed.tokens[i]
        assert "tool-out" in token["in"] and "tool" in token["classes"]
        assert token["style"] is None and "low" not in token["classes"]
        assert "A=" not in token["title"] and "p=" not in token["title"]  # placeholders are not shown as numbers
    for i in [*range(start), *range(end, n)]:
        assert "tool-out" not in parsed.tokens[i]["in"] and parsed.tokens[i]["style"]
        assert "low" not in parsed.tokens[i]["classes"]  # p = 0.9
    assert "".join(parsed.tokens[i]["text"] for i in range(start, end)) == output_block(CALL, OUTPUT, ToolMarkers())
    assert parsed.bars_in_tool_output == 0
    assert out.count('class="cut"') == 1  # at token 3; the segment start inside the output has none
    assert out.count('class="tool-out tool-failed"') == 1 and "tool output · error" in parsed.labels
    assert "1 tool call (1 failed: error)" in out


def test_tool_output_is_escaped():
    ep = _tool_episode(["ok"])
    out = episode_html(ep, build_byte_tokenizer(), scale=0.5, low_prob=0.5)
    assert "<script" not in out and "</script" not in out
    box = out[out.index('class="tool-out"') :]
    box = box[: box.index("</span></span>")]  # the box's HTML, up to its last token's end
    for escaped in ("&lt;", "&gt;", "&amp;", "&quot;", "&#x27;"):
        assert f">{escaped}</span>" in box
    # Parsed back, every tool token's text and hover title are what was written: nothing broke out of an attribute.
    start, end = ep.tool_spans[0]
    tokens = _parse(out).tokens
    assert "".join(tokens[i]["text"] for i in range(start, end)) == output_block(CALL, OUTPUT, ToolMarkers())
    assert all(tokens[i]["title"].startswith(f"token {i}: {tokens[i]['text']!r}  ") for i in range(start, end))
    assert "tool output · ok" in _parse(out).labels and "tool-failed" not in out and "(all ok)" in out


def test_the_code_block_before_an_output_is_outlined_as_the_call():
    ep = _tool_episode(["ok"])
    parsed = _parse(episode_html(ep, build_byte_tokenizer(), scale=0.5, low_prob=0.5))
    in_call = "".join(t["text"] for _, t in sorted(parsed.tokens.items()) if "tool-call" in t["in"])
    assert in_call == CALL[CALL.index("<code>") :]
    assert all(t["style"] for t in parsed.tokens.values() if "tool-call" in t["in"])  # the policy's: trained, coloured
    assert "tool call" in parsed.labels


def test_a_call_is_outlined_only_where_the_markers_close_right_before_the_output():
    tok = build_byte_tokenizer()
    pieces = token_pieces(tok, tok("ab<code>x</code>OUT<code>y</code>zzOUT", add_special_tokens=False)["input_ids"])
    spans = [(16, 19), (35, 38)]
    # The second block closes two tokens before its output: not where the loop would have stopped.
    assert tool_call_ranges(pieces, spans, ToolMarkers()) == [(2, 16), None]
    assert tool_call_ranges(pieces, spans, ToolMarkers("```python", "```")) == [None, None]
    # Another run's markers: then only the outputs are marked.
    ep = _tool_episode(["ok"], call="Check.\n```python\nprint(1 < 2)\n```")
    parsed = _parse(episode_html(ep, tok, scale=0.5, low_prob=0.5))
    assert not any("tool-call" in t["in"] for t in parsed.tokens.values())
    marked = _parse(episode_html(ep, tok, 0.5, 0.5, ToolMarkers("```python", "```")))
    assert any("tool-call" in t["in"] for t in marked.tokens.values())


def test_without_statuses_the_outputs_are_counted_and_unlabelled():
    out = episode_html(_tool_episode(), build_byte_tokenizer(), scale=0.5, low_prob=0.5)
    assert "1 tool call" in out and "failed" not in out and "all ok" not in out
    assert "tool output" in _parse(out).labels
    # Statuses that cannot be paired with the outputs are counted, but label none.
    out = episode_html(_tool_episode(["timeout", "ok", "ok"]), build_byte_tokenizer(), 0.5, 0.5)
    assert "3 tool calls (1 failed: timeout)" in out and "tool output · " not in out


def test_the_colour_scale_ignores_tool_tokens_and_the_legend_explains_the_boxes():
    page = credit_section("run", [_tool_episode(["ok"])], build_byte_tokenizer(), 0.5)
    assert "advantage +0.50" in page  # not the tool tokens' placeholder 2.0
    assert "tool output (not trained)" in page


# Rendered by episode_html and credit_section before tool outputs were drawn apart: responses without tools must
# render exactly so.
OLD_EPISODE = (
    '<div class="episode"><div class="meta">reward 1 · gold 7 · 3 tokens · 2 segments (+0.50, -0.25) · stop · first '
    'wrong token 2</div><details><summary>prompt</summary><div class="prompt">Q?</div></details><div class="response">'
    '<span class="tok" style="background: rgba(0, 150, 60, 0.850);" title="token 0: &#x27;a&#x27;  A=+0.500  p=0.990  '
    'segment 1 [0, 1)">a</span><span class="cut"></span><span class="tok low" style="background: rgba(210, 40, 40, '
    '0.475);" title="token 1: &#x27;&lt;&#x27;  A=-0.250  p=0.300  segment 2 [1, 3)  V(start)=0.400">&lt;</span><span '
    'class="tok err" style="background: rgba(210, 40, 40, 0.475);" title="token 2: &#x27;b&#x27;  A=-0.250  first '
    'wrong token  p=0.950  segment 2 [1, 3)  V(start)=0.400">b</span></div></div>'
)
OLD_LEGEND = (
    '<h2>run</h2><div class="legend meta"><span style="background: rgba(0, 150, 60, 0.850);">advantage +0.50</span>'
    '<span style="background: rgba(210, 40, 40, 0.850);">advantage -0.50</span><span class="low">p &lt; 0.5</span>'
    '<span><span class="cut"></span> segment start</span><span class="tok err">first wrong token</span> (hover a '
    "token for its numbers)</div>"
)
OLD_UNSCORED = (
    '<div class="episode"><div class="meta">no reward · gold None · 8 tokens · 1 segments (+0.00) · length</div>'
    '<details><summary>prompt</summary><div class="prompt">&lt;p&gt;</div></details><div class="response"><span '
    'class="tok" style="background: rgba(210, 40, 40, 0.550);" title="token 0: &#x27;x&#x27;  A=-0.300  segment 1 '
    '[0, 8)">x</span><span class="tok" style="background: rgba(210, 40, 40, 0.400);" title="token 1: &#x27; &#x27;  '
    'A=-0.200  segment 1 [0, 8)"> </span><span class="tok" style="background: rgba(210, 40, 40, 0.250);" title="token '
    '2: &#x27;=&#x27;  A=-0.100  segment 1 [0, 8)">=</span><span class="tok" style="background: rgba(0, 150, 60, '
    '0.100);" title="token 3: &#x27; &#x27;  A=+0.000  segment 1 [0, 8)"> </span><span class="tok" style="background: '
    'rgba(0, 150, 60, 0.250);" title="token 4: &#x27;&quot;&#x27;  A=+0.100  segment 1 [0, 8)">&quot;</span><span '
    'class="tok" style="background: rgba(0, 150, 60, 0.400);" title="token 5: &#x27;&#x27;  A=+0.200  segment 1 [0, '
    '8)"></span><span class="tok" style="background: rgba(0, 150, 60, 0.550);" title="token 6: &#x27;é&#x27;  '
    'A=+0.300  segment 1 [0, 8)">é</span><span class="tok" style="background: rgba(0, 150, 60, 0.700);" title="token '
    '7: &#x27;&quot;&#x27;  A=+0.400  segment 1 [0, 8)">&quot;</span></div></div>'
)


def test_responses_without_tool_outputs_render_as_before():
    tok = build_byte_tokenizer()
    ep = Episode(
        id="e0", group_id="g", prompt="Q?", response="a<b", gold="7", prompt_token_ids=[1],
        response_token_ids=tok("a<b", add_special_tokens=False)["input_ids"],
        response_logprobs=[math.log(p) for p in (0.99, 0.3, 0.95)], finish_reason="stop", reward=1.0,
        segments=[Segment(start=0, end=1, advantage=0.5), Segment(start=1, end=3, advantage=-0.25, value=0.4)],
        first_error=2,
    )  # fmt: skip
    assert episode_html(ep, tok, 0.5, 0.5) == OLD_EPISODE
    assert credit_section("run", [ep], tok, 0.5) == OLD_LEGEND + OLD_EPISODE
    ids = tok('x = "é"', add_special_tokens=False)["input_ids"]
    unscored = Episode(
        id="e1", group_id="g", prompt="<p>", response="", prompt_token_ids=[1], response_token_ids=ids,
        finish_reason="length", segments=[Segment(start=0, end=len(ids), advantage=0.0)],
        token_advantages=[0.1 * k - 0.3 for k in range(len(ids))],
    )  # fmt: skip
    assert episode_html(unscored, tok, 0.5, 0.5) == OLD_UNSCORED
