from __future__ import annotations

import json

import pytest

from spo_cli.episode import Episode, Segment, read_episodes, token_advantages, write_episodes
from spo_cli.errors import SpoUserError


def make_episode(**kw) -> Episode:
    base = dict(
        id="e0",
        group_id="g0",
        prompt="2+2=",
        response="4",
        prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5, 6],
        response_logprobs=[-0.1, -0.2, -0.3],
        finish_reason="stop",
        reward=1.0,
    )
    base.update(kw)
    return Episode(**base)


def test_jsonl_round_trip(tmp_path):
    eps = [make_episode(), make_episode(id="e1", segments=[Segment(start=0, end=1), Segment(start=1, end=3, advantage=0.5)])]
    path = tmp_path / "eps.jsonl"
    write_episodes(path, eps)
    assert read_episodes(path) == eps
    assert json.loads(path.read_text().splitlines()[0])["schema_version"] == 5
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "eps.jsonl"
    write_episodes(path, [make_episode()])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(SpoUserError, match=rf"{path}:2: not valid JSON"):
        read_episodes(path)


def test_invalid_record_names_field_and_line(tmp_path):
    path = tmp_path / "eps.jsonl"
    row = make_episode().model_dump()
    row["response_logprobs"] = [-0.1]
    path.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(SpoUserError, match=rf"{path}:2: bad episode: .*1 entries for 3 response tokens"):
        read_episodes(path)
    row = make_episode().model_dump()
    row["finish_reason"] = "eos"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SpoUserError, match=rf"{path}:1: bad episode: finish_reason"):
        read_episodes(path)


def test_schema_version_mismatch(tmp_path):
    path = tmp_path / "eps.jsonl"
    row = make_episode().model_dump()
    row["schema_version"] = 99
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SpoUserError, match="schema_version 99"):
        read_episodes(path)


def test_missing_file():
    with pytest.raises(SpoUserError, match="episode file not found"):
        read_episodes("/nonexistent/eps.jsonl")


@pytest.mark.parametrize(
    "spans",
    [[(0, 2)], [(0, 1), (2, 3)], [(0, 2), (2, 4)], [(1, 3)], [(0, 0), (0, 3)]],
    ids=["short", "gap", "overrun", "late-start", "empty-segment"],
)
def test_segments_must_cover_the_response(spans):
    with pytest.raises(ValueError):
        make_episode(segments=[Segment(start=s, end=e) for s, e in spans])


def test_token_advantages_broadcast_segments():
    ep = make_episode(segments=[Segment(start=0, end=1, advantage=-1.0), Segment(start=1, end=3, advantage=2.0)])
    assert token_advantages(ep) == [-1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="partition"):
        token_advantages(make_episode())
    with pytest.raises(ValueError, match="estimate"):
        token_advantages(make_episode(segments=[Segment(start=0, end=3)]))


def test_version_1_records_still_read(tmp_path):
    row = json.loads(make_episode(segments=[Segment(start=0, end=3, advantage=0.5)]).model_dump_json())
    row["schema_version"] = 1
    for key in ("response_entropies", "token_advantages", "response_values", "value_targets", "first_error"):
        del row[key]
    del row["segments"][0]["is_boundary"]
    (tmp_path / "v1.jsonl").write_text(json.dumps(row) + "\n")
    (ep,) = read_episodes(tmp_path / "v1.jsonl")
    assert ep.segments[0].is_boundary and ep.token_advantages is None
    assert token_advantages(ep) == [0.5, 0.5, 0.5]
    write_episodes(tmp_path / "v4.jsonl", [ep])
    assert json.loads((tmp_path / "v4.jsonl").read_text())["schema_version"] == 5


def test_token_advantages_take_precedence_over_segments():
    ep = make_episode(segments=[Segment(start=0, end=3, advantage=0.5)], token_advantages=[0.5, 0.0, 0.5])
    assert token_advantages(ep) == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="token_advantages has 2 entries for 3"):
        make_episode(token_advantages=[0.1, 0.2])


def test_first_error_is_a_token_of_the_response():
    assert make_episode(first_error=2).first_error == 2
    with pytest.raises(ValueError, match="first_error is token 3 of a response of 3 tokens"):
        make_episode(first_error=3)


def test_tool_spans_round_trip_and_are_checked(tmp_path):
    import pydantic

    from spo_cli.episode import Episode, read_episodes, write_episodes

    base = dict(id="e", group_id="g", prompt="p", response="r", prompt_token_ids=[1], response_token_ids=[2, 3, 4, 5],
                finish_reason="stop")  # fmt: skip
    episode = Episode(**base, tool_spans=[(1, 3)])
    write_episodes(tmp_path / "e.jsonl", [episode])
    assert read_episodes(tmp_path / "e.jsonl")[0].tool_spans == [(1, 3)]
    for bad in ([(3, 1)], [(0, 5)], [(2, 3), (1, 2)], [(2, 2)]):
        with pytest.raises(pydantic.ValidationError, match="tool_spans"):
            Episode(**base, tool_spans=bad)
