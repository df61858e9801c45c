"""Time to accuracy on the synthetic task: SPO-chain, SPO-tree, GRPO, GRPO with the probability mask and single-stream
SPO, from one shared warm start, with the same wall-clock budget, several seeds each (the paper's Figures 3c and 5a
in miniature).

Every run trains the shipped tiny_arith recipe of its method from the same supervised warm start (made once, seed 0,
shared through `warm_start.load_from`), with `run.seed` set to the seed, until its iterations have used `--budget-s`
seconds (sampling, estimation and optimization: `train.time_budget_s`; evaluations, checkpoints and single-stream's
offline pass do not count), evaluating sampled held-out accuracy on a fixed subset each time its iterations pass
another `--eval-every-s` seconds (`eval.eval_every_s`, so every method is measured at the same wall times whatever
its iteration cost). Runs go seed by seed, methods interleaved, so a slow phase of the machine does not land on one
method. Prints each method's held-out accuracy at fractions of the budget (mean and min-max over seeds) and each
run's whole wall time, and writes the plot with `spo report`. Report what it shows, whatever it shows.

    python bench/learning.py                                   # 5 methods x 3 seeds x 180 s: ~1 h on 2 cores
    python bench/learning.py --budget-s 60 --seeds 0 --methods grpo,chain --eval-problems 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, parse_methods, parse_seeds, spo
METHODS = {
    "grpo": ("tiny_arith_grpo.yaml", []),
    "grpo_mask": ("tiny_arith_grpo.yaml", ["loss.use_prob_mask=true", "loss.prob_mask_rho=0.9"]),
    "chain": ("tiny_arith_chain.yaml", []),
    "tree": ("tiny_arith_tree.yaml", []),
    "single_stream": ("tiny_arith_single_stream.yaml", []),
}
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget-s", type=float, default=180.0, help="RL seconds per run")
    parser.add_argument("--eval-every-s", type=float, help="RL seconds between held-out evaluations; default budget/6")
    # 600 x 4 samples: a sampled accuracy near 0.9 is then measured to about +-0.006 (one standard error).
    parser.add_argument("--eval-problems", type=int, default=600, help="fixed held-out subset (of 600)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "learning")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    methods = parse_methods(args.methods, METHODS)
    seeds = parse_seeds(args.seeds)
    eval_every_s = args.budget_s / 6 if args.eval_every_s is None else args.eval_every_s

    warm = args.out / "warm"
    if not (warm / "warm_start" / "warm_start.json").is_file():
        print("warm start (once, shared by every run)", file=sys.stderr)
        spo("sft", "recipes/tiny_arith_grpo.yaml", f"run.output_dir={warm}", "--overwrite")
    runs: dict[str, list[Path]] = {m: [] for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            recipe, extra = METHODS[method]
            run_dir = args.out / method / f"seed{seed}"
            if not (run_dir / "summary.json").is_file():
                start = time.perf_counter()
                spo("train", f"recipes/{recipe}", *extra, f"run.output_dir={run_dir}", f"run.seed={seed}",
                    f"warm_start.load_from={warm / 'warm_start'}",
                    "train.iterations=100000", f"train.time_budget_s={args.budget_s}",
                    f"eval.eval_every_s={eval_every_s}", f"eval.max_problems={args.eval_problems}",
                    "eval.greedy=false", "eval.num_samples=4", "logging.progress=false", "--overwrite")  # fmt: skip
                seconds = time.perf_counter() - start
                (run_dir / "bench_wall_s.json").write_text(json.dumps(seconds))
                print(f"{method} seed {seed}: {seconds:.0f} s", file=sys.stderr)
            wall[method].append(json.loads((run_dir / "bench_wall_s.json").read_text()))
            runs[method].append(run_dir)

    from spo_cli.report import write_report
    from spo_cli.report.curves import band, read_curves

    print(f"\nheld-out sampled accuracy (4 samples x {args.eval_problems} problems) at fractions of a {args.budget_s:.0f} s "
          f"RL budget; mean [min, max] over seeds {seeds}")  # fmt: skip
    print(f"{'method':<14}" + "".join(f"{f'{int(100 * f)}%':>22}" for f in FRACTIONS) + f"{'iterations':>12}"
          + f"{'run wall s':>12}")  # fmt: skip
    table = {}
    for method, dirs in runs.items():
        curves = [read_curves(d, method, accuracy="sampled") for d in dirs]
        series = [(c.accuracy.seconds, c.accuracy.values) for c in curves]
        grid, mean, low, high = band(series, points=401)
        cells = []
        for f in FRACTIONS:
            i = min(range(len(grid)), key=lambda k: abs(grid[k] - f * grid[-1]))
            cells.append({"seconds": grid[i], "mean": mean[i], "min": low[i], "max": high[i]})
        iterations = [int(c.reward.iterations[-1]) for c in curves]
        table[method] = {"at_fraction": dict(zip(map(str, FRACTIONS), cells)), "iterations": iterations,
                         "final": [c.accuracy.values[-1] for c in curves], "run_wall_s": wall[method]}  # fmt: skip
        print(f"{method:<14}" + "".join(f"{c['mean']:>8.3f} [{c['min']:.3f},{c['max']:.3f}]" for c in cells)
              + f"{statistics.median(iterations):>12.0f}" + f"{statistics.median(wall[method]):>12.0f}")  # fmt: skip
    write_report([(m, d) for m, dirs in runs.items() for d in dirs], args.out / "report", accuracy="sampled",
                 episodes_per_run=2, log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    if args.json:
        out = args.out.resolve()
        out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        settings = vars(args) | {"out": str(out), "json": None, "eval_every_s": eval_every_s}
        args.json.write_text(json.dumps({"settings": settings,
                                         "methods": table}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
