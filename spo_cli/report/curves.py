"""Learning curves of runs: held-out accuracy and training reward against iteration and wall time.

Reading a run directory is separate from drawing: `read_curves` returns plain series, `plot_curves` draws the
paper's Figures 3c/5a layout (several runs, or several seeds of one method as a mean with a min-max band).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spo_cli.errors import SpoUserError

# The PNG "Software" text of curves.png, which marks it as written by spo report.
PNG_SOFTWARE = "spo report"

# Held-out accuracy metrics in the order preferred for the plot.
ACCURACY_KEYS = ("eval/greedy_accuracy", "eval/sampled_accuracy")
# The ground-truth credit metrics a run logs on a task that knows each wrong response's first error (spo_cli/credit.py).
CREDIT_KEYS = ("credit/misplaced_blame", "credit/uniform_blame", "credit/localization")


@dataclass
class Series:
    """Points of one metric: x values (iteration or seconds) and y values, same length, x increasing."""

    iterations: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class RunCurves:
    label: str
    run_dir: Path
    reward: Series
    accuracy: Series
    accuracy_key: str | None  # which eval metric `accuracy` holds, None without evaluations
    credit: dict[str, Series] = field(default_factory=dict)  # CREDIT_KEYS the run logged, by iteration


def read_curves(run_dir: Path, label: str, accuracy: str | None = None) -> RunCurves:
    """The curves of one run directory (metrics.jsonl, eval_before.json, eval_after.json).

    `accuracy` picks the held-out metric ("greedy" or "sampled"); default greedy where the run has it.

    Wall time is the sum of the iterations' own times (sampling, estimating, optimizing), so evaluations,
    checkpoints and time lost to a crash before a resume do not count. Raises SpoUserError for a directory
    without metrics.jsonl.
    """
    from spo_cli.metrics import read_records

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SpoUserError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    records = sorted(read_records(path), key=lambda r: r.get("iteration", 0))  # a damaged line: SpoUserError
    elapsed, clock = {0: 0.0}, 0.0
    reward = Series()
    credit: dict[str, Series] = {}
    for r in records:
        it = int(r.get("iteration", 0))
        clock += _number(r, "time/iteration_s", path, default=0.0)
        elapsed[it] = clock
        for key in ("reward", *CREDIT_KEYS):
            if key in r:
                series = reward if key == "reward" else credit.setdefault(key, Series())
                series.iterations.append(it)
                series.seconds.append(clock)
                series.values.append(_number(r, key, path))
    points: dict[int, dict] = {}
    for name in ("eval_before.json", "eval_after.json"):
        if (run_dir / name).is_file():
            result = json.loads((run_dir / name).read_text())
            points[int(result.get("iteration", 0))] = result
    for r in records:
        if any(k in r for k in ACCURACY_KEYS):
            points[int(r["iteration"])] = r
    keys = ACCURACY_KEYS if accuracy is None else (f"eval/{accuracy}_accuracy",)
    key = next((k for k in keys if any(k in p for p in points.values())), None)
    accuracy = Series()
    for it in sorted(points):
        if key in points[it] and it in elapsed:
            accuracy.iterations.append(it)
            accuracy.seconds.append(elapsed[it])
            accuracy.values.append(_number(points[it], key, run_dir))
    return RunCurves(label, run_dir, reward, accuracy, key, credit)


def _number(record: dict, key: str, path: Path, default: float | None = None) -> float:
    """record[key] as a float; SpoUserError naming the file, the iteration and the key when it is not a number."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpoUserError(
            f"{path}: iteration {record.get('iteration', '?')}: {key} is {value!r}, not a number: the file is spo's "
            "own log and this record is damaged"
        )
    return float(value)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): [1, 2, 3, 4], 2 -> [1, 1.5, 2.5, 3.5]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def band(series: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 200) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max of several (x, y) curves on a common grid up to the shortest curve's end (linear interpolation).

    Returns (grid, mean, low, high). A single curve comes back as itself.
    """
    import numpy as np

    if len(series) == 1:
        x, y = series[0]
        return list(x), list(y), list(y), list(y)
    end = min(max(x) for x, _ in series)
    start = max(min(x) for x, _ in series)
    grid = np.linspace(start, end, points) if end > start else np.array([start])
    ys = np.array([np.interp(grid, np.asarray(x, float), np.asarray(y, float)) for x, y in series])
    return grid.tolist(), ys.mean(0).tolist(), ys.min(0).tolist(), ys.max(0).tolist()


def plot_curves(groups: dict[str, list[RunCurves]], path: Path, smooth: int = 0) -> None:
    """A 2x2 PNG: held-out accuracy (top) and training reward (bottom) against iteration (left) and wall time (right).

    `groups` maps a legend label to its runs (several seeds draw a mean line with a min-max band). `smooth`: the
    reward's moving-average window (0 = about a twentieth of the run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    accuracy_names = {c.accuracy_key for runs in groups.values() for c in runs if c.accuracy_key}
    for g, (label, runs) in enumerate(groups.items()):
        color = colors[g % len(colors)]
        suffix = f" ({len(runs)} runs)" if len(runs) > 1 else ""
        for row, metric in enumerate(("accuracy", "reward")):
            for col, axis in enumerate(("iterations", "seconds")):
                ax = axes[row][col]
                curves = []
                for c in runs:
                    s = getattr(c, metric)
                    if not s.values:
                        continue
                    y = s.values
                    if metric == "reward":
                        y = moving_average(y, smooth or max(1, len(y) // 20))
                    curves.append((getattr(s, axis), y))
                if not curves:
                    continue
                x, mean, low, high = band(curves)
                marker = "o" if metric == "accuracy" and len(runs) == 1 else None
                ax.plot(x, mean, color=color, marker=marker, markersize=3, label=label + suffix)
                if len(curves) > 1:
                    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    accuracy_title = "held-out accuracy" + (
        f" ({', '.join(sorted(n.removeprefix('eval/').replace('_accuracy', '') for n in accuracy_names))})"
        if accuracy_names
        else ""
    )
    for row, title in enumerate((accuracy_title, "training reward (moving average)")):
        for col, xlabel in enumerate(("iteration", "wall time (s, sampling + estimation + optimization)")):
            ax = axes[row][col]
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    _save(fig, path)


def plot_credit(groups: dict[str, list[RunCurves]], path: Path, smooth: int = 0) -> None:
    """A 1x2 PNG of the ground-truth credit metrics against iteration: misplaced blame (solid; dashed, the share of
    tokens before the first error, what one advantage per response would score) and localization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (
        (axes[0], "credit/misplaced_blame", "misplaced blame (lower is better)"),
        (axes[1], "credit/localization", "localization (higher is better)"),
    )
    for g, (label, runs) in enumerate(groups.items()):
        color = colors[g % len(colors)]
        for ax, key, _ in panels:
            for style, name in (("-", key), ("--", "credit/uniform_blame" if key.endswith("blame") else None)):
                curves = [
                    (c.credit[name].iterations, moving_average(c.credit[name].values, smooth or 5))
                    for c in runs
                    if name in c.credit and c.credit[name].values
                ]
                if not curves:
                    continue
                x, mean, low, high = band(curves)
                ax.plot(x, mean, style, color=color, label=label if style == "-" else None)
                if len(curves) > 1 and style == "-":
                    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    for ax, _, title in panels:
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # The Software text chunk marks the file as spo's: a later report may replace it, never a user's own PNG.
    fig.savefig(tmp, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    tmp.replace(path)
