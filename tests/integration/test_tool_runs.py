"""Training runs whose responses call a Python tool (docs/tools.md): the tiny model's calculator warm start writes
`<code>print(a*b)</code>` for its multiplication, the sandbox runs it, and SPO-chain estimates values with rollouts
that go through the tool loop too. A run killed while it samples (tool calls in flight) and while it optimizes
resumes to exactly the uninterrupted run's metrics, and the saved episodes keep their tool spans, so standalone
`spo partition` and `spo estimate-values` reproduce the loop's segments and advantages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_cli.checkpoint import latest_checkpoint
from spo_cli.episode import read_episodes, write_episodes

from ..conftest import tiny_recipe_dict, write_recipe
from .test_faults import spo
from .test_train import assert_same_metrics, read_metrics

TOOLS = {"max_tool_calls": 2, "wall_seconds": 5, "cpu_seconds": 2, "memory_mb": 256, "sandbox": {"workers": 2}}
SECTIONS = dict(
    task={
        "calculator": ["+", "-", "*"], "min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "max_mul": 99,
        "max_val": 9999, "eval_steps": [1], "eval_per_step": 4,
    },
    warm_start={"steps": 300, "batch_size": 16, "learning_rate": 1e-3, "log_every": 100},
    sampling={"prompts_per_iteration": 4, "num_generations": 4, "max_completion_length": 64, "tools": TOOLS},
    partitioner={"kind": "cutpoint", "rho": 0.9, "interval": 2},
    estimator={"kind": "mc_chain", "rollouts": 2},
    train={"iterations": 3, "save_steps": 1, "save_total_limit": 2},
    # 16 episodes from a 300-step warm start are sometimes all wrong (which depends on the sampler's random stream);
    # every iteration still runs its update, so the kill points and the methods' update paths are always reached.
    loss={"skip_zero_advantage": False},
    eval={"num_samples": 0},
)  # fmt: skip


def tool_spans_of(run: Path, iteration: int) -> list:
    return [ep.tool_spans for ep in read_episodes(run / "episodes" / f"iter_{iteration:06d}.jsonl")]


WARM_START = Path(__file__).resolve().parents[1] / "assets" / "tiny_calculator" / "warm_start"


def write_sft_recipe(where: str | Path) -> Path:
    """The recipe whose `spo sft` made WARM_START (tests/assets/tiny_calculator/README.md)."""
    return write_recipe(Path(where) / "sft.yaml", tiny_recipe_dict(Path(where), **SECTIONS))


@pytest.fixture(scope="module")
def warm_start() -> Path:
    """The calculator warm start every run here starts from (committed: what differs between the runs is the RL;
    `warm_start.load_from` refuses it if SECTIONS' model, task or warm-start settings changed)."""
    return WARM_START


@pytest.mark.slow  # ~100 s (five short runs): CI's end-to-end phase
def test_a_tool_run_killed_mid_sampling_resumes_exactly_and_its_episodes_stand_alone(tmp_path, warm_start):
    warm = f"warm_start.load_from={warm_start}"
    ref = write_recipe(tmp_path / "ref.yaml", tiny_recipe_dict(tmp_path / "ref", **SECTIONS))
    done = spo("train", str(ref), warm)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_run = tmp_path / "ref" / "run"
    metrics = read_metrics(ref_run)
    assert all(m["tools/call_frequency"] > 0 for m in metrics), "the warm start calls the tool"
    assert any(spans for spans in tool_spans_of(ref_run, 1))
    assert all(m["mc/generated_tokens"] > 0 for m in metrics)

    recipe = write_recipe(tmp_path / "killed.yaml", tiny_recipe_dict(tmp_path / "killed", **SECTIONS))
    run = tmp_path / "killed" / "run"
    for attempt, (crash_at, survivor) in enumerate([("sample:2", 1), ("optimize:3", 2)]):
        out = spo("train", str(recipe), warm, *(["--resume"] if attempt else []), crash_at=crash_at)
        assert out.returncode == -9, (crash_at, out.stderr[-2000:])
        assert latest_checkpoint(run).name == f"iter_{survivor:06d}", crash_at
    resumed = spo("train", str(recipe), warm, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(metrics, read_metrics(run))
    assert [tool_spans_of(run, i) for i in (1, 2, 3)] == [tool_spans_of(ref_run, i) for i in (1, 2, 3)]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (ref_run, run)]
    assert summaries[0]["eval_after"] == summaries[1]["eval_after"]

    # Iteration 1's episodes, stripped of the loop's stages, partitioned and valued standalone with its policy.
    in_loop = read_episodes(ref_run / "episodes" / "iter_000001.jsonl")
    write_episodes(tmp_path / "sampled.jsonl", [ep.model_copy(update={"segments": None, "token_advantages": None}) for ep in in_loop])
    out = spo("partition", str(ref), "--in", str(tmp_path / "sampled.jsonl"), "--out", str(tmp_path / "parted.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    out = spo(
        "estimate-values", str(ref), "--in", str(tmp_path / "parted.jsonl"), "--out", str(tmp_path / "valued.jsonl"),
        "--policy", str(ref_run / "warm_start"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    standalone = read_episodes(tmp_path / "valued.jsonl")
    assert [ep.tool_spans for ep in standalone] == [ep.tool_spans for ep in in_loop]
    assert [ep.segments for ep in standalone] == [ep.segments for ep in in_loop]
    assert [ep.token_advantages for ep in standalone] == [ep.token_advantages for ep in in_loop]


# The other methods, each for two iterations from the same warm start: their episodes (SPO-tree's node episodes)
# carry tool calls and each trains. SPO-tree's segments are shorter than a call, so calls cross levels.
METHODS = {
    "mc_tree": dict(
        estimator={"kind": "mc_tree", "branching": [2, 2], "segment_tokens": 24},
        train={"episodes_per_iteration": 16},
    ),
    "vineppo": dict(estimator={"kind": "vineppo", "rollouts": 2}, partitioner={"kind": "step"}),
    "single_stream": dict(
        estimator={"kind": "single_stream", "offline_samples": 2},
        sampling={"prompts_per_iteration": 16, "num_generations": 1},
        task={"train_pool_size": 32},
    ),
}


@pytest.mark.slow  # ~20 s each
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_tool_calls(tmp_path, warm_start, method):
    sections = {name: dict(values) for name, values in SECTIONS.items() if name != "partitioner"}
    sections["train"] = {"iterations": 2, "save_steps": 2}
    for name, values in METHODS[method].items():  # the method's algorithm sections replace, the others add
        sections[name] = values if name in ("estimator", "partitioner") else {**sections.get(name, {}), **values}
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path, **sections))
    done = spo("train", str(recipe), f"warm_start.load_from={warm_start}")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    metrics = read_metrics(run)
    # An update runs whenever there is an episode to train; SPO-tree keeps none when every leaf of every tree scored
    # the same (as 16 leaves of a 300-step warm start may, depending on the random stream).
    signal = any(m["reward_std"] > 0 for m in metrics)
    assert len(metrics) == 2 and (sum(m["optimizer_steps"] for m in metrics) > 0 or not signal)
    stored = sorted((run / ("trees" if method == "mc_tree" else "episodes")).glob("iter_*.jsonl"))
    episodes = [ep for path in stored for ep in read_episodes(path)]
    called = [ep for ep in episodes if ep.tool_spans]
    assert called and all(ep.metadata["tool_calls"] for ep in called), method
