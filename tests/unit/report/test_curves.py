"""Learning curves read from a run directory, and the smoothing and seed-band math (by hand)."""

from __future__ import annotations

import json

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.report.curves import band, moving_average, plot_credit, plot_curves, read_curves


def _run(tmp_path, records, before=None, after=None, torn=False):
    run = tmp_path / "run"
    run.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in records) + ('{"iteration": 9, "rew' if torn else "")
    (run / "metrics.jsonl").write_text(text)
    if before is not None:
        (run / "eval_before.json").write_text(json.dumps(before))
    if after is not None:
        (run / "eval_after.json").write_text(json.dumps(after))
    return run


def test_read_curves_puts_evaluations_on_the_iteration_and_wall_clock_axes(tmp_path):
    records = [
        {"iteration": 1, "reward": 0.5, "time/iteration_s": 2.0},
        {"iteration": 2, "reward": 0.6, "time/iteration_s": 3.0, "eval/greedy_accuracy": 0.4, "eval/sampled_accuracy": 0.3},
        {"iteration": 3, "reward": 0.7, "time/iteration_s": 1.0},
    ]
    run = _run(
        tmp_path, records, before={"iteration": 0, "eval/greedy_accuracy": 0.2},
        after={"iteration": 3, "eval/greedy_accuracy": 0.5}, torn=True,
    )  # fmt: skip
    curves = read_curves(run, "a")
    assert curves.reward.iterations == [1, 2, 3]
    assert curves.reward.seconds == [2.0, 5.0, 6.0]  # running sum of the iterations' own times
    assert curves.reward.values == [0.5, 0.6, 0.7]
    assert curves.accuracy_key == "eval/greedy_accuracy"
    assert curves.accuracy.iterations == [0, 2, 3]
    assert curves.accuracy.seconds == [0.0, 5.0, 6.0]
    assert curves.accuracy.values == [0.2, 0.4, 0.5]
    sampled = read_curves(run, "a", accuracy="sampled")
    assert sampled.accuracy_key == "eval/sampled_accuracy" and sampled.accuracy.iterations == [2]


def test_read_curves_falls_back_to_sampled_accuracy_and_rejects_a_non_run(tmp_path):
    run = _run(tmp_path, [{"iteration": 1, "reward": 1.0, "time/iteration_s": 1.0, "eval/sampled_accuracy": 0.7}])
    curves = read_curves(run, "a")
    assert curves.accuracy_key == "eval/sampled_accuracy" and curves.accuracy.values == [0.7]
    with pytest.raises(SpoUserError, match="no metrics.jsonl"):
        read_curves(tmp_path, "b")


def test_moving_average_by_hand():
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert moving_average([3, 0, 3], 1) == [3, 0, 3]
    assert moving_average([2, 4, 6], 10) == [2, 3, 4]


def test_band_interpolates_seeds_up_to_the_shortest():
    # Curve A: y = x on [0, 4]; curve B: y = 2 on [0, 2]. On the grid [0, 1, 2]: A = 0, 1, 2; B = 2, 2, 2.
    grid, mean, low, high = band([([0, 4], [0, 4]), ([0, 2], [2, 2])], points=3)
    assert grid == [0, 1, 2]
    assert mean == [1, 1.5, 2] and low == [0, 1, 2] and high == [2, 2, 2]
    assert band([([0, 1], [5, 6])]) == ([0, 1], [5, 6], [5, 6], [5, 6])


def test_plot_curves_writes_a_png(tmp_path):
    run = _run(tmp_path, [{"iteration": i, "reward": i / 10, "time/iteration_s": 1.0} for i in range(1, 6)],
               before={"iteration": 0, "eval/greedy_accuracy": 0.1}, after={"iteration": 5, "eval/greedy_accuracy": 0.3})  # fmt: skip
    curves = read_curves(run, "a")
    out = tmp_path / "out" / "curves.png"
    plot_curves({"a": [curves, curves]}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert not list(out.parent.glob(".*tmp"))


def test_credit_metrics_are_read_by_iteration_and_plotted(tmp_path):
    records = [
        {"iteration": 1, "reward": 0.1, "time/iteration_s": 1.0, "credit/misplaced_blame": 0.5, "credit/uniform_blame": 0.6},
        {"iteration": 2, "reward": 0.2, "time/iteration_s": 1.0},  # no wrong response with a known error
        {"iteration": 3, "reward": 0.3, "time/iteration_s": 1.0, "credit/misplaced_blame": 0.3, "credit/localization": 0.8},
    ]
    curves = read_curves(_run(tmp_path, records), "a")
    assert curves.credit["credit/misplaced_blame"].iterations == [1, 3]
    assert curves.credit["credit/misplaced_blame"].values == [0.5, 0.3]
    assert curves.credit["credit/uniform_blame"].values == [0.6] and curves.credit["credit/localization"].values == [0.8]
    out = tmp_path / "credit.png"
    plot_credit({"a": [curves]}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"spo report" in out.read_bytes()[:4096]
