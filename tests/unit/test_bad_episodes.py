"""Damaged episode files: non-finite numbers (Python's json reads the bare tokens NaN and Infinity), log-probs
above 0, negative token ids, and ids or lengths the model cannot take. Each is refused naming file, line and
field (exit code 2 from the CLI), never passed on, written as null or met with a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spo_cli.episode import Segment, model_fit_problem, read_episodes, write_episodes
from spo_cli.errors import SpoUserError

from ..conftest import spo_in_process, tiny_recipe_dict, write_recipe
from .test_episode import make_episode

NAN, INF = float("nan"), float("inf")
TINY_VOCAB = 259  # the tiny recipe model's vocabulary: build_byte_tokenizer's 3 special tokens and 256 bytes
TINY_CONTEXT = 64  # the tiny model's max_position_embeddings in the context-length tests


def _row(**changes) -> dict:
    return {**json.loads(make_episode().model_dump_json()), **changes}


def _episode_file(tmp_path: Path, *rows: dict) -> Path:
    """A JSONL file of `rows`, written by the json module: NaN and inf become the bare tokens NaN and Infinity."""
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _refused(tmp_path: Path, command: str, path: Path, message: str, *args: str, **recipe_sections) -> None:
    """`spo <command> ... args` on `path` exits 2 with `message` (file:line: ...), no traceback and no output file."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path, **recipe_sections))
    out = tmp_path / "out.jsonl"
    code, err = spo_in_process(command, str(recipe), "--in", str(path), "--out", str(out), *args)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and not out.exists()


# ------------------------------------------------------------------------------------------- read time

PARTITIONED = [{"start": 0, "end": 3, "advantage": 0.5}]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"response_logprobs": [-0.1, NAN, -0.3]}, "response_logprobs.1: Input should be a finite number, not nan"),
        ({"response_logprobs": [-0.1, -INF, -0.3]}, "response_logprobs.1: Input should be a finite number, not -inf"),
        ({"response_logprobs": [-0.1, 0.5, -0.3]}, "response_logprobs: item 1 is 0.5, above 0: not a log-probability"),
        ({"response_logprobs": [-0.1, 2e-4, -0.3]}, "response_logprobs: item 1 is 0.0002, above 0"),
        ({"response_entropies": [0.1, INF, 0.0]}, "response_entropies.1: Input should be a finite number, not inf"),
        ({"reward": NAN}, "reward: Input should be a finite number, not nan"),
        ({"reward": -INF}, "reward: Input should be a finite number, not -inf"),
        ({"segments": [{"start": 0, "end": 3, "advantage": NAN}]}, "segments.0.advantage: Input should be a finite"),
        ({"segments": [{"start": 0, "end": 3, "value": INF}]}, "segments.0.value: Input should be a finite"),
        ({"segments": PARTITIONED, "token_advantages": [0.0, NAN, 0.0]}, "token_advantages.1: Input should be a"),
        ({"response_values": [0.0, INF, 0.0]}, "response_values.1: Input should be a finite"),
        ({"value_targets": [None, NAN, 1.0]}, "value_targets.1: Input should be a finite number, not nan"),
        ({"metadata": {"tree": {"value": NAN}}}, "metadata: tree.value is nan, not a finite number"),
        ({"prompt_token_ids": [1, -2]}, "prompt_token_ids.1: Input should be greater than or equal to 0, not -2"),
        ({"response_token_ids": [4, -5, 6]}, "response_token_ids.1: Input should be greater than or equal to 0, not -5"),
    ],
    ids=[
        "nan-logprob", "-inf-logprob", "positive-logprob", "logprob-past-tolerance", "inf-entropy", "nan-reward",
        "-inf-reward", "nan-advantage", "inf-segment-value", "nan-token-advantage", "inf-response-value",
        "nan-value-target", "nan-metadata", "negative-prompt-id", "negative-response-id",
    ],
)  # fmt: skip
def test_damaged_numbers_are_refused_naming_file_line_and_field(tmp_path, changes, message):
    path = _episode_file(tmp_path, _row(), _row(id="e1", **changes))
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2: bad episode: {message}")):
        read_episodes(path)


def test_a_number_too_large_for_a_float_is_refused(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(_row()).replace('"reward": 1.0', '"reward": 1e999') + "\n")  # json reads it as inf
    message = f"{path}:1: bad episode: reward: Input should be a finite number, not inf"
    with pytest.raises(SpoUserError, match=re.escape(message)):
        read_episodes(path)


def test_rounding_above_zero_and_legitimate_nulls_are_read(tmp_path):
    row = _row(response_logprobs=[-0.1, 5e-5, 0.0], reward=None, value_targets=[None, 0.5, None])
    path = _episode_file(tmp_path, row)
    (episode,) = read_episodes(path)
    assert episode.response_logprobs == [-0.1, 5e-5, 0.0] and episode.reward is None


def test_partition_refuses_a_nan_logprob(tmp_path):
    path = _episode_file(tmp_path, _row(), _row(id="e1", response_logprobs=[-0.1, NAN, -0.3]))
    message = f"{path}:2: bad episode: response_logprobs.1: Input should be a finite number, not nan"
    _refused(tmp_path, "partition", path, message)


def test_estimate_refuses_a_nan_reward(tmp_path):
    path = _episode_file(tmp_path, _row(segments=PARTITIONED), _row(id="e1", reward=NAN, segments=PARTITIONED))
    message = f"{path}:2: bad episode: reward: Input should be a finite number, not nan"
    _refused(tmp_path, "estimate-values", path, message)


def test_metadata_nested_too_deep_names_file_and_line(tmp_path):
    nested = "[" * 200_000 + "]" * 200_000
    deep = json.dumps(_row(id="e1")).replace('"metadata": {}', '"metadata": {"x": ' + nested + "}")
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + deep + "\n")
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2: not valid JSON: nested more than")):
        read_episodes(path)  # was: RecursionError
    nested: dict = {}
    for _ in range(150):  # json reads this; the checks and writers after it recurse per level
        nested = {"x": nested}
    path = _episode_file(tmp_path, _row(metadata=nested))
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:1: bad episode: metadata: nested more than 100 levels")):
        read_episodes(path)
    _refused(tmp_path, "partition", path, f"{path}:1: bad episode: metadata: nested more than 100 levels")


def test_huge_rewards_get_the_advantages_of_their_scaled_values(tmp_path):
    from spo_cli.estimate.group import group_advantages

    rewards = [1e308, -1e308, 0.0, 1.7e308]  # legal JSON; (r - mean) ** 2 overflowed (OverflowError)
    path = _episode_file(tmp_path, *(_row(id=f"e{i}", reward=r, segments=PARTITIONED) for i, r in enumerate(rewards)))
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))  # estimator: group
    out = tmp_path / "out.jsonl"
    code, err = spo_in_process("estimate-values", str(recipe), "--in", str(path), "--out", str(out))
    assert code == 0, err
    expected = group_advantages([1.0, -1.0, 0.0, 1.7], ["g0"] * 4, eps=0.0)  # eps: negligible next to 1e308
    assert [ep.segments[0].advantage for ep in read_episodes(out)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("estimator", [{"kind": "rloo"}, {"kind": "group", "scale_by_std": False}])
def test_rewards_whose_differences_overflow_are_refused(tmp_path, estimator):
    rewards = [1.7e308, -1.7e308, -1.7e308]  # 1.7e308 - (-1.7e308) is beyond the largest float (was: a traceback)
    path = _episode_file(tmp_path, *(_row(id=f"e{i}", reward=r, segments=PARTITIONED) for i, r in enumerate(rewards)))
    message = f"{path}: group g0: rewards span more than the largest float (1.7e+308 - -1.7e+308)"
    _refused(tmp_path, "estimate-values", path, message, estimator=estimator)


# ------------------------------------------------------------------------------------------ write time


def test_writing_a_non_finite_number_raises_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "episodes.jsonl"
    write_episodes(path, [make_episode()])
    before = path.read_text()
    # model_copy skips validation, as stages do: the writer is the last line of defence.
    bad_tokens = make_episode(id="e1").model_copy(update={"token_advantages": [0.0, NAN, 0.0]})
    message = f"episode e1: token_advantages.1 is nan, not a finite number: {path} not written"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_episodes(path, [make_episode(), bad_tokens])
    bad_segment = make_episode(id="e2", segments=[Segment(start=0, end=3).model_copy(update={"advantage": -INF})])
    with pytest.raises(ValueError, match=re.escape("episode e2: segments.0.advantage is -inf")):
        write_episodes(path, [bad_segment])
    bad_metadata = make_episode(id="e3").model_copy(update={"metadata": {"tree": {"value": INF}}})
    with pytest.raises(ValueError, match=re.escape("episode e3: metadata.tree.value is inf")):
        write_episodes(path, [bad_metadata])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------------- where the model is known


def test_model_fit_problem():
    fits = make_episode(prompt_token_ids=[0, 9], response_token_ids=[9, 9, 9], response_logprobs=None)
    assert model_fit_problem(fits, vocab_size=10, max_context=5) is None
    assert model_fit_problem(fits, vocab_size=10, max_context=None) is None
    assert model_fit_problem(fits, vocab_size=9, max_context=5).startswith(
        "prompt_token_ids.1: token id 9 is outside the model's vocabulary (9 ids)"
    )
    assert model_fit_problem(fits, vocab_size=10, max_context=4).startswith(
        "response_token_ids: 2 prompt + 3 response tokens = 5, more than the model's context of 4 tokens"
    )
    no_prompt = fits.model_copy(update={"prompt_token_ids": []})
    assert model_fit_problem(no_prompt, 10, 5).startswith("prompt_token_ids: empty")


def test_partition_refuses_token_ids_outside_the_vocabulary_before_scoring(tmp_path):
    unscored = _row(id="e1", response_token_ids=[4, TINY_VOCAB, 6], response_logprobs=None)
    path = _episode_file(tmp_path, _row(), unscored)
    _refused(
        tmp_path, "partition", path,
        f"{path}:2: bad episode: response_token_ids.1: token id {TINY_VOCAB} is outside the model's vocabulary "
        f"({TINY_VOCAB} ids); were the episodes sampled by another model? (checked against the recipe model)",
    )  # fmt: skip


def test_estimate_refuses_token_ids_outside_the_vocabulary_before_rolling_out(tmp_path):
    bad = _row(id="e1", prompt_token_ids=[1, 10_000], segments=PARTITIONED)
    path = _episode_file(tmp_path, _row(segments=PARTITIONED), bad)
    message = f"{path}:2: bad episode: prompt_token_ids.1: token id 10000 is outside the model's vocabulary"
    _refused(tmp_path, "estimate-values", path, message, estimator={"kind": "mc_chain"})


def test_estimate_refuses_token_ids_outside_the_critics_vocabulary(tmp_path, tiny_policy):
    from spo_cli.estimate.critic.model import build_critic, save_critic
    from spo_cli.recipe import Critic, Optim

    model, tokenizer = tiny_policy
    critic_dir = tmp_path / "critic"
    save_critic(build_critic(model, Critic(), Optim(), vocab_size=len(tokenizer), seed=0, device="cpu"), critic_dir)
    path = _episode_file(tmp_path, _row(segments=PARTITIONED, response_token_ids=[4, 5, 300]))
    message = (
        f"{path}:1: bad episode: response_token_ids.2: token id 300 is outside the model's vocabulary "
        f"({TINY_VOCAB} ids); were the episodes sampled by another model? (checked against the critic in {critic_dir})"
    )
    _refused(tmp_path, "estimate-values", path, message, "--critic", str(critic_dir), estimator={"kind": "gae"})


@pytest.fixture
def policy_dir(tmp_path, tiny_policy) -> Path:
    from spo_cli.models import save_model

    save_model(*tiny_policy, tmp_path / "policy")
    return tmp_path / "policy"


@pytest.mark.parametrize("command", ["partition", "estimate-values"])
def test_token_ids_outside_the_given_policys_vocabulary_are_refused_without_loading_it(tmp_path, policy_dir, command):
    # Scored and partitioned: neither the whole partitioner nor the group estimator runs the model, so the ids were
    # never checked (and the output claimed they came from --policy).
    outside = _row(id="e1", response_token_ids=[4, 5, 300], segments=PARTITIONED)
    path = _episode_file(tmp_path, _row(segments=PARTITIONED), outside)
    message = (
        f"{path}:2: bad episode: response_token_ids.2: token id 300 is outside the model's vocabulary "
        f"({TINY_VOCAB} ids); were the episodes sampled by another model? (checked against {policy_dir})"
    )
    _refused(tmp_path, command, path, message, "--policy", str(policy_dir))


@pytest.mark.parametrize(
    ("changes", "partitioner"),
    [({"response_logprobs": None}, {"kind": "whole"}), ({}, {"kind": "step"})],
    ids=["scored-by-the-model", "step-partitioner"],
)
def test_partition_refuses_a_response_longer_than_the_context(tmp_path, changes, partitioner):
    response = 40
    long = _row(
        id="e1",
        prompt_token_ids=[1] * (TINY_CONTEXT - response + 1),
        response_token_ids=[4] * response,
        **{"response_logprobs": [-0.1] * response, **changes},
    )
    path = _episode_file(tmp_path, _row(), long)
    message = (
        f"{path}:2: bad episode: response_token_ids: {TINY_CONTEXT - response + 1} prompt + {response} response tokens "
        f"= {TINY_CONTEXT + 1}, more than the model's context of {TINY_CONTEXT} tokens (max_position_embeddings)"
    )
    _refused(tmp_path, "partition", path, message, partitioner=partitioner, model={"max_position_embeddings": TINY_CONTEXT})


def test_partition_refuses_an_episode_without_prompt_tokens_before_scoring(tmp_path):
    path = _episode_file(tmp_path, _row(prompt_token_ids=[], response_logprobs=None))
    _refused(tmp_path, "partition", path, f"{path}:1: bad episode: prompt_token_ids: empty")
