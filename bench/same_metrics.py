"""Does a change leave training unchanged? Runs every tiny recipe for a few iterations with two checkouts of spo
(e.g. main and a refactoring branch) and compares their metric records key by key.

    git worktree add /tmp/before main
    python bench/same_metrics.py --before /tmp/before --after . --iterations 5

Both checkouts train from the committed warm start (tests/assets/tiny_arith/warm_start) with the same seed, one
torch thread each, without held-out evaluations; every metric except timings must be identical (compared exactly,
and the largest relative difference printed). Prints one line per recipe and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT

# Wall-clock measurements: they differ between any two runs.
TIMINGS = ("time/", "tokens_per_second")


def train(checkout: Path, recipe: Path, out: Path, iterations: int, warm: Path) -> list[dict]:
    """`spo train` of `recipe` with the spo of `checkout`; the run's metric records."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "spo_cli", "train", str(recipe), f"run.output_dir={out}", f"train.iterations={iterations}",
            f"warm_start.load_from={warm}", "eval.before_training=false", "eval.after_training=false",
            "hardware.num_threads=1", "logging.progress=false", "--overwrite"]  # fmt: skip
    done = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: spo train {recipe.name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def differences(before: list[dict], after: list[dict]) -> tuple[list[str], float]:
    """The metric keys (iteration:key) that differ, and the largest relative difference among numeric ones."""
    if len(before) != len(after):
        return [f"{len(before)} vs {len(after)} records"], math.inf
    differ, worst = [], 0.0
    for a, b in zip(before, after):
        keys = {k for k in a.keys() | b.keys() if not k.startswith(TIMINGS)}
        for key in sorted(keys):
            if a.get(key) != b.get(key):
                differ.append(f"{a.get('iteration')}:{key}")
                if isinstance(a.get(key), int | float) and isinstance(b.get(key), int | float):
                    worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), abs(b[key]), 1e-12))
                else:
                    worst = math.inf
    return differ, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--recipes", default="tiny_arith_*.yaml", help="a glob in recipes/")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "same_metrics")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    warm = ROOT / "tests" / "assets" / "tiny_arith" / "warm_start"
    recipes = sorted((ROOT / "recipes").glob(args.recipes))

    def compare(recipe: Path) -> tuple[str, list[str], float, int]:
        runs = [train(checkout.resolve(), recipe, args.out / side / recipe.stem, args.iterations, warm)
                for side, checkout in (("before", args.before), ("after", args.after))]  # fmt: skip
        differ, worst = differences(*runs)
        return recipe.stem, differ, worst, sum(len(r) for r in runs[0])

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compare, recipes))
    for name, differ, worst, compared in results:
        verdict = "identical" if not differ else f"{len(differ)} differ (largest relative {worst:.2e}): {differ[:6]}"
        print(f"{name:<28} {args.iterations} iterations, {compared} values compared: {verdict}")
    sys.exit(1 if any(differ for _, differ, _, _ in results) else 0)


if __name__ == "__main__":
    main()
