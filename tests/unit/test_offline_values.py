"""Offline prompt values of single-stream SPO: merge, shards, fingerprint and the values file (no model).

The whole estimate runs here with a scripted sampler, so sharding, seeding and resuming are checked without torch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from spo_cli.estimate.single_stream import offline_values as ov
from spo_cli.errors import SpoUserError
from spo_cli.recipe import parse_recipe
from spo_cli.sample import Completion
from spo_cli.tasks import Problem, Task
from spo_cli.seeding import derive_seed

from ..conftest import tiny_recipe_dict

SINGLE_STREAM = {"estimator": {"kind": "single_stream", "offline_samples": 3}}


def recipe(tmp_path: Path, **sections):
    """The tiny recipe with single_stream on a pool of 10 arith prompts; `sections` update its sections."""
    data = tiny_recipe_dict(tmp_path, task={"train_pool_size": 10}, **SINGLE_STREAM)
    for name, values in sections.items():
        data[name].update(values)
    return parse_recipe(data)


# ------------------------------------------------------------------------------------------- merge


def test_merge_accumulates_a_key_across_shards_in_order_of_first_appearance():
    shards = [
        (["a", "b"], [[1.0, 0.0], [0.0, 0.0]]),
        (["c", "a"], [[0.5, 0.0], [1.0, 1.0]]),
    ]
    values, subsampled = ov.merge_scores(shards, max_scores_per_prompt=8, seed=0)
    assert list(values) == ["a", "b", "c"]
    assert values == {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0], "c": [0.5, 0.0]}
    assert subsampled == 0


def test_merge_subsamples_long_lists_with_a_seed_per_key():
    scores = [float(i) for i in range(10)]
    shards = [(["a"], [scores[:5]]), (["b", "a"], [[1.0], scores[5:]])]
    values, subsampled = ov.merge_scores(shards, max_scores_per_prompt=4, seed=7)
    assert subsampled == 1 and values["b"] == [1.0]
    assert values["a"] == random.Random(derive_seed(7, "offline-merge", "a")).sample(scores, 4)
    assert len(set(values["a"])) == 4 and set(values["a"]) <= set(scores)
    again, _ = ov.merge_scores(shards, max_scores_per_prompt=4, seed=7)
    assert again == values, "the merge is reproducible"
    by_seed = {tuple(ov.merge_scores(shards, 4, seed)[0]["a"]) for seed in range(5)}
    assert len(by_seed) > 1, "the subsample depends on the run seed"
    # A list of exactly the maximum is kept as it is, in its order.
    assert ov.merge_scores([(["a"], [scores[:4]])], 4, 7) == ({"a": scores[:4]}, 0)


def test_value_statistics_and_file_format():
    values = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0]}
    stats = ov.value_statistics(values)
    assert stats == {
        "prompts": 2.0,
        "scores": 6.0,
        "min_scores_per_prompt": 2.0,
        "max_scores_per_prompt": 4.0,
        "mean_score": 0.5,
        "frac_scores_above_0": 0.5,
        "frac_prompts_never_above_0": 0.5,
    }
    assert ov.format_values(values) == json.dumps(values, indent=2) + "\n"
    assert ov.format_values(values).startswith('{\n  "a": [\n    1.0,')


# ------------------------------------------------------------------------------------ values file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.json"
    path.write_text(text)
    return path


def test_read_offline_values_accepts_the_reference_format(tmp_path):
    path = write(tmp_path, '{"What is 1+1?": [1, 0, 0.5], "Empty?": []}')
    assert ov.read_offline_values(path) == {"What is 1+1?": [1.0, 0.0, 0.5], "Empty?": []}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "a": [1, 0],\n  "b": [1,, 0]\n}\n', "values.json:3:11: not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": [1], "b": "1"}', 'prompt "b": expected a list of finite numbers, got "1"'),
        ('{"a": [1], "b": [1, "x"], "c": {}}', 'prompt "b"'),
        ('{"a": [true]}', 'prompt "a"'),
        ('{"a": [NaN]}', 'prompt "a"'),
        ('{"a": [1], "a": [0]}', 'prompt "a" appears twice'),
    ],
)
def test_read_offline_values_names_the_problem(tmp_path, text, message):
    with pytest.raises(SpoUserError, match="values.json") as info:
        ov.read_offline_values(write(tmp_path, text))
    assert message in str(info.value)


def test_read_offline_values_missing_file(tmp_path):
    with pytest.raises(SpoUserError, match="not found"):
        ov.read_offline_values(tmp_path / "nope.json")


# --------------------------------------------------------------------------- shards and fingerprint


def test_shard_layout():
    assert ov.shard_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert ov.shard_ranges(8, 4) == [range(0, 4), range(4, 8)]
    assert ov.shard_dir(Path("out/values.json")) == Path("out/values.json.shards")
    assert ov.shard_path(Path("d"), 3) == Path("d/shard_00003.json")
    assert ov.shard_seed(5, 2) == derive_seed(5, "offline-values", 2) != ov.shard_seed(5, 3)


def fingerprint(**changes):
    base = dict(
        policy={"model": {"kind": "tiny"}},
        task={"kind": "arith", "train_pool_size": 10},
        params=ov.SamplingParams(n=4, temperature=0.6, stop=("\n\n",), logprobs=False),
        max_prompt_length=None,
        prompts_per_shard=4,
        seed=0,
        keys=["q0", "q1"],
    )
    return ov.build_fingerprint(**{**base, **changes})


def test_fingerprint_differences_name_dotted_fields():
    old, new = fingerprint(), fingerprint(params=ov.SamplingParams(n=8, temperature=1.0, stop=("\n\n",), logprobs=False))
    assert ov.fingerprint_differences(old, old) == []
    assert ov.fingerprint_differences(old, new) == [
        "sampling.n: 4 -> 8",
        "sampling.temperature: 0.6 -> 1.0",
        "samples_per_prompt: 4 -> 8",
    ]
    assert ov.fingerprint_differences({"a": 1}, {"b": 1}) == ['a: 1 -> "(absent)"', 'b: "(absent)" -> 1']
    keys = ov.fingerprint_differences(fingerprint(), fingerprint(keys=["q0", "q2"]))
    assert [d.split(":")[0] for d in keys] == ["prompt_keys_sha256"]


def test_keys_digest_is_order_and_boundary_sensitive():
    assert ov.keys_digest(["a", "b"]) != ov.keys_digest(["b", "a"])
    assert ov.keys_digest(["ab", "c"]) != ov.keys_digest(["a", "bc"])


def test_open_shard_dir_writes_then_checks_the_manifest(tmp_path):
    directory = tmp_path / "v.json.shards"
    ov.open_shard_dir(directory, fingerprint())
    assert json.loads((directory / "manifest.json").read_text())["samples_per_prompt"] == 4
    ov.open_shard_dir(directory, fingerprint())  # same settings: resumable
    with pytest.raises(SpoUserError) as info:
        ov.open_shard_dir(directory, fingerprint(prompts_per_shard=8, seed=1))
    message = str(info.value)
    assert "prompts_per_shard: 4 -> 8" in message and "seed: 0 -> 1" in message
    assert f"Delete {directory}" in message and "another --out" in message


def test_shards_without_a_manifest_are_refused(tmp_path):
    directory = tmp_path / "v.json.shards"
    ov.write_shard(ov.shard_path(directory, 0), 0, ["q0"], [[1.0]])
    with pytest.raises(SpoUserError, match="no manifest.json"):
        ov.open_shard_dir(directory, fingerprint())


def test_read_shard_checks_its_prompts(tmp_path):
    path = ov.shard_path(tmp_path, 1)
    ov.write_shard(path, 1, ["q4", "q5"], [[1.0, 0.0], [0.0, 0.0]])
    assert ov.read_shard(path, 1, ["q4", "q5"], 2) == [[1.0, 0.0], [0.0, 0.0]]
    for index, keys, k in [(2, ["q4", "q5"], 2), (1, ["q4", "q6"], 2), (1, ["q4", "q5"], 3)]:
        with pytest.raises(SpoUserError, match="shard_00001.json: does not hold shard"):
            ov.read_shard(path, index, keys, k)
    path.write_text("{")
    with pytest.raises(SpoUserError, match="unreadable shard"):
        ov.read_shard(path, 1, ["q4", "q5"], 2)


# ------------------------------------------------------------------------------------------ settings


def test_sampling_settings_are_the_eval_ones(tmp_path):
    spec = recipe(
        tmp_path,
        eval={"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_completion_length": 12},
        sampling={"stop": ["\n\n"], "keep_eos_token": False, "max_context_length": 100},
    )
    params = ov.offline_sampling_params(spec, ("####", "\n\n"), 5, max_context=1024)
    assert params == ov.SamplingParams(
        n=5, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=12, max_total_tokens=100,
        stop=("\n\n", "####"), keep_eos_token=False, logprobs=False,
    )  # fmt: skip
    fallback = ov.offline_sampling_params(recipe(tmp_path), (), 5, max_context=1024)
    assert fallback.max_new_tokens == 24 and fallback.max_total_tokens == 1024 and fallback.temperature == 1.0


def test_default_samples_per_prompt(tmp_path):
    assert ov.default_samples_per_prompt(recipe(tmp_path)) == 3
    assert ov.default_samples_per_prompt(parse_recipe(tiny_recipe_dict(tmp_path))) == 8


def test_policy_identity(tmp_path):
    spec = recipe(tmp_path)
    assert ov.policy_identity(spec, None) == {"model": spec.model.model_dump(mode="json")}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"123")
    (tmp_path / "tokenizer.json").write_text("{}")
    ident = ov.policy_identity(spec, tmp_path)
    assert ident["path"] == str(tmp_path.resolve()) and list(ident["files"]) == ["config.json", "model.safetensors"]
    assert ident["files"]["model.safetensors"][0] == 3


# ------------------------------------------------------------------------------- the whole estimate


class ScriptedSampler:
    """Prompt "qI" gets n responses of which the first I % (n + 1) are "yes": a known score per prompt."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []

    def encode_prompts(self, prompts):
        return [list(p.encode()) for p in prompts]

    def generate(self, prompts, params, seed):
        self.calls.append((list(prompts), seed))
        groups = []
        for p in prompts:
            right = int(p[1:]) % (params.n + 1)
            groups.append([Completion([], [], "yes" if j < right else "no", "stop") for j in range(params.n)])
        return groups


def pool_task(questions: list[str]) -> Task:
    return Task(
        name="scripted",
        train_problems=lambda iteration, count, seed: [],
        eval_problems=lambda: [],
        format_prompt=lambda q: q,
        grade=lambda responses, golds: [1.0 if r == g else 0.0 for r, g in zip(responses, golds)],
        train_pool=lambda seed: [Problem(id=q, question=q, gold="yes") for q in questions],
    )


def estimate(spec, task, sampler, out, **kwargs):
    logs: list[str] = []
    kwargs = {"prompts_per_shard": 4, "policy_label": "scripted", **kwargs}
    values = ov.estimate_offline_values(spec, task, sampler, None, out, log=logs.append, **kwargs)
    return values, logs


def test_estimate_samples_every_prompt_once_per_shard_and_resumes(tmp_path):
    spec = recipe(tmp_path)
    task = pool_task([f"q{i}" for i in range(10)])
    out = tmp_path / "values.json"
    sampler = ScriptedSampler()
    values, logs = estimate(spec, task, sampler, out)
    # K = offline_samples = 3: qI scores I % 4 ones, then zeros.
    assert values == {f"q{i}": [1.0] * (i % 4) + [0.0] * (3 - i % 4) for i in range(10)}
    assert list(values) == [f"q{i}" for i in range(10)]
    assert json.loads(out.read_text()) == values
    assert [(prompts, seed) for prompts, seed in sampler.calls] == [
        (["q0", "q1", "q2", "q3"], derive_seed(0, "offline-values", 0)),
        (["q4", "q5", "q6", "q7"], derive_seed(0, "offline-values", 1)),
        (["q8", "q9"], derive_seed(0, "offline-values", 2)),
    ]
    shards = tmp_path / "values.json.shards"
    assert sorted(p.name for p in shards.iterdir()) == [
        "manifest.json", "shard_00000.json", "shard_00001.json", "shard_00002.json",
    ]  # fmt: skip
    assert any("merged into 10 prompts, 30 scores" in line for line in logs)

    # A killed run: shard 1 and the merged file are missing. The re-run samples only shard 1, with its own seed.
    first = out.read_bytes()
    out.unlink()
    (shards / "shard_00001.json").unlink()
    kept = (shards / "shard_00000.json").stat()
    again = ScriptedSampler()
    values2, logs2 = estimate(spec, task, again, out)
    assert [seed for _, seed in again.calls] == [derive_seed(0, "offline-values", 1)]
    assert "skipping 2 of 3 shards already sampled" in "\n".join(logs2)
    assert out.read_bytes() == first and values2 == values
    assert (shards / "shard_00000.json").stat().st_mtime_ns == kept.st_mtime_ns

    # Changing only the merge reuses every shard.
    third = ScriptedSampler()
    capped, _ = estimate(spec, task, third, out, max_scores_per_prompt=2)
    assert third.calls == [] and all(len(v) == min(2, 3) for v in capped.values())

    # Other sampling settings are refused, naming what differs.
    with pytest.raises(SpoUserError, match="samples_per_prompt: 3 -> 2"):
        estimate(spec, task, ScriptedSampler(), out, samples_per_prompt=2)


def test_estimate_drops_long_prompts_and_needs_a_pool(tmp_path):
    spec = recipe(tmp_path, sampling={"max_prompt_length": 2})
    sampler = ScriptedSampler()
    values, logs = estimate(spec, pool_task(["q1", "q22", "q3"]), sampler, tmp_path / "v.json")
    assert list(values) == ["q1", "q3"]
    assert "skipping 1 training prompts longer than sampling.max_prompt_length (2 tokens)" in logs
    with pytest.raises(SpoUserError, match="drops every training prompt"):
        estimate(spec, pool_task(["q100"]), sampler, tmp_path / "w.json")
    no_pool = pool_task(["q1"])
    no_pool.train_pool = None
    with pytest.raises(SpoUserError, match="set task.train_pool_size"):
        estimate(spec, no_pool, sampler, tmp_path / "x.json")
    with pytest.raises(SpoUserError, match="pass --samples-per-prompt"):
        estimate(recipe(tmp_path, estimator={"offline_samples": 0}), pool_task(["q1"]), sampler, tmp_path / "y.json")


def test_duplicate_prompts_accumulate(tmp_path):
    values, _ = estimate(recipe(tmp_path), pool_task(["q1", "q2", "q1"]), ScriptedSampler(), tmp_path / "v.json", prompts_per_shard=2)
    # q1 in shards 0 and 1 with 3 samples each: 6 scores (<= 8, so all kept) in shard order.
    assert values == {"q1": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "q2": [1.0, 1.0, 0.0]}
