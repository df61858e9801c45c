"""Data-parallel estimators that sample or keep state (test_distributed.py's setting): SPO-chain's Monte Carlo
rollouts and single-stream SPO's offline pass, prompt sampling and tracker, split between two processes, train like
one process. A file of its own so that pytest-xdist (`--dist loadfile`) runs it beside test_distributed.py's runs.
"""

from __future__ import annotations

import json

import pytest

from ..conftest import free_port, tiny_recipe_dict, write_recipe
from .test_distributed import FROM_WARM_START, SECTIONS, metrics, spo_train


@pytest.mark.parametrize(
    "name,sections",
    [
        # Monte Carlo rollouts: the distinct states of an iteration are split between the processes.
        ("chain", {"partitioner": {"kind": "cutpoint"}, "estimator": {"kind": "mc_chain", "rollouts": 4},
                   "loss": {"beta": 0.0, "use_prob_mask": True}}),
        # The offline pass, prompt sampling and the tracker's scoring passes: every process keeps the same tracker.
        ("single_stream", {"task": {"train_pool_size": 24}, "sampling": {"prompts_per_iteration": 16, "num_generations": 1},
                           "estimator": {"kind": "single_stream", "offline_samples": 2}, "loss": {"beta": 0.0}}),
    ],
)  # fmt: skip
def test_estimators_that_sample_or_track_split_their_work_and_match_one_process(tmp_path, name, sections):
    base = {k: dict(v) for k, v in SECTIONS.items()}
    base["train"]["iterations"] = 2
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values} if key not in ("estimator", "partitioner", "loss") else values
    one = write_recipe(tmp_path / "one.yaml", tiny_recipe_dict(tmp_path / "one", **base))
    two_sections = {**base, "train": {**base["train"], "per_device_train_batch_size": 2},
                    "hardware": {"num_processes": 2, "main_process_port": free_port()}}  # fmt: skip
    two = write_recipe(tmp_path / "two.yaml", tiny_recipe_dict(tmp_path / "two", **two_sections))
    for path in (one, two):  # both from test_distributed's committed warm start (the task may differ: it is allowed)
        done = spo_train(path, FROM_WARM_START)
        assert done.returncode == 0, done.stderr[-4000:]
    a, b = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "two" / "run")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("reward", "policy_loss", "grad_norm", "entropy", "mc/unique_states", "single_stream/value"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["iteration"], key)
    if name == "chain":
        assert a[0]["mc/unique_states"] > 0
    else:
        one_values = json.loads((tmp_path / "one" / "run" / "offline_values.json").read_text())
        assert json.loads((tmp_path / "two" / "run" / "offline_values.json").read_text()) == one_values
        tracker = "checkpoints/iter_000002/single_stream_tracker.json"
        t1, t2 = (json.loads((tmp_path / d / "run" / tracker).read_text()) for d in ("one", "two"))
        beliefs = "beliefs"
        assert t1[beliefs].keys() == t2[beliefs].keys()
        for key, belief in t1[beliefs].items():
            other = t2[beliefs][key]
            assert belief["visits"] == other["visits"]
            # The scoring passes batch differently in each process: log-probs (and so rho) agree to rounding.
            assert belief["alpha"] == pytest.approx(other["alpha"], rel=1e-5)
            assert belief["beta"] == pytest.approx(other["beta"], rel=1e-5)
