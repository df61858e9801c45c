"""The methods compared on the long-chain testbed (recipes/README.md), at equal wall time and at equal sampled tokens.

Every run trains its method's shipped `recipes/long_arith_<method>.yaml` from one shared supervised warm start
(bench/assets/long_arith_t8, through `warm_start.load_from`), with `run.seed` set to the seed, until its iterations
have used `--budget-s` seconds (sampling, estimation and optimization: `train.time_budget_s`), keeping a
checkpoint of every iteration. Afterwards two checkpoints of every run are evaluated with `spo eval` on the same
held-out problems (`--eval-problems`, 4 samples each at the recipes' temperature 1.0):

- equal wall time: the last checkpoint whose iterations had used at most the budget in all (the run's own last
  iteration crosses it, by up to one iteration: minutes for the Monte Carlo methods, so their last checkpoint is
  also evaluated and shown as "final");
- equal sampled tokens: the last checkpoint whose iterations had generated at most T tokens in all (responses,
  tree nodes and Monte Carlo rollouts: `tokens/generated` in metrics.jsonl). T is the smallest total any run of the
  first invocation reached, then kept in the results for every later seed, so every seed's figure is final when it
  is measured. That checkpoint is exactly what a run stopped by a budget of T tokens would have ended with.

The budget, 420 s, is the GRPO pilot's (recipes/README.md): fixed before any other method ran, it is where the
cheapest baseline has clearly left the warm start's evaluation noise (+0.058, ~5 standard errors, on 2 threads).
Results accumulate in `--json` run by run, so the grid can be measured a seed per session; settings that make
figures incomparable (budget, evaluation problems, jobs, warm start) must match the file's.

Single-stream SPO's offline pass (its prior values, sampled once before RL) counts in neither budget, as in
bench/learning.py; its cost is printed beside. Runs go seed by seed with the methods interleaved, `--jobs` at a
time with one torch thread each (two 2-thread runs on 2 cores slow each other far more than 1-thread runs do).
Prints each method's accuracy at both budgets (mean, and every seed), the iterations and tokens behind it and the
credit metrics its training logged; writes the curves of training reward against seconds and against tokens.
Report what it shows, whatever it shows.

    python bench/long_arith_learning.py --json bench/results/long_arith_learning.json      # 9 methods x 3 seeds
    python bench/long_arith_learning.py --seeds 1 --json bench/results/long_arith_learning.json   # add seed 1
    python bench/long_arith_learning.py --methods grpo,chain_int2 --seeds 0 --budget-s 60 --eval-problems 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, parse_methods, parse_seeds, spo
METHODS = {
    "grpo": ("long_arith_grpo.yaml", []),
    "grpo_mask": ("long_arith_grpo.yaml", ["loss.use_prob_mask=true", "loss.prob_mask_rho=0.9"]),
    "rloo": ("long_arith_rloo.yaml", []),
    "chain_int2": ("long_arith_chain.yaml", []),
    "chain_int5": ("long_arith_chain.yaml", ["partitioner.interval=5"]),
    "tree": ("long_arith_tree.yaml", []),
    "vineppo": ("long_arith_vineppo.yaml", []),
    "segment_gae": ("long_arith_segment_gae.yaml", []),
    "single_stream": ("long_arith_single_stream.yaml", []),
}
CREDIT = ("credit/misplaced_blame", "credit/uniform_blame", "credit/localization")



def train(method: str, seed: int, run_dir: Path, warm: Path, budget_s: float, threads: int) -> None:
    if (run_dir / "summary.json").is_file():
        return
    recipe, extra = METHODS[method]
    start = time.perf_counter()
    spo("train", f"recipes/{recipe}", *extra, f"run.output_dir={run_dir}", f"run.seed={seed}",
        f"warm_start.load_from={warm / 'warm_start'}", "train.iterations=100000", f"train.time_budget_s={budget_s}",
        "train.save_steps=1", "train.save_total_limit=null", "eval.before_training=false",
        "eval.after_training=false", f"hardware.num_threads={threads}", "logging.progress=false", "--overwrite",
        threads=threads)  # fmt: skip
    print(f"{method} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def iteration_records(run_dir: Path) -> list[dict]:
    from spo_cli.metrics import read_records

    return [r for r in read_records(run_dir / "metrics.jsonl") if "iteration" in r]


def checkpoint_within(records: list[dict], key: str, limit: float) -> int:
    """The last iteration by whose end the run had used at most `limit` of `key` in all (`tokens/generated` or
    `time/iteration_s`); 0 when its first iteration alone used more (at that budget it is the warm start)."""
    used, last = 0.0, 0
    for r in records:
        used += r[key]
        if used > limit:
            break
        last = r["iteration"]
    return last


def evaluate(recipe: str, checkpoints: list[Path], out: Path, problems: int, threads: int) -> list[dict]:
    args = [a for c in checkpoints for a in ("--checkpoint", str(c))]
    spo("eval", f"recipes/{recipe}", f"task.eval_per_step={problems // 4}", f"hardware.num_threads={threads}",
        *args, "--samples", "4", "--temperature", "1.0", "--top-p", "1.0", "--chunk-size", "150", "--out", str(out),
        threads=threads)  # fmt: skip
    return json.loads((out / "results.json").read_text())["results"]


def summarize_run(run_dir: Path, method: str, marks: dict, problems: int, threads: int, warm_row: dict) -> dict:
    records = iteration_records(run_dir)
    ckpt = run_dir / "checkpoints"
    points = {
        "time": checkpoint_within(records, "time/iteration_s", marks["budget_s"]),
        "tokens": checkpoint_within(records, "tokens/generated", marks["tokens_mark"]),
        "final": records[-1]["iteration"],  # the run's end: its last iteration crossed the budget
    }
    last = points["final"]
    evaluated = sorted({i for i in points.values() if i > 0})
    rows = evaluate(METHODS[method][0], [ckpt / f"iter_{i:06d}" for i in evaluated], run_dir / "bench_eval", problems,
                    threads) if evaluated else []  # fmt: skip
    by_label = {r["checkpoint"]: r for r in rows}
    result = {"iterations": last, "tokens_total": sum(r["tokens/generated"] for r in records),
              "seconds": sum(r["time/iteration_s"] for r in records)}  # fmt: skip
    for name, iteration in points.items():
        # Iteration 0: the run's first iteration alone went past the mark, so at the mark it is the warm start.
        row = warm_row if iteration == 0 else next(r for label, r in by_label.items() if label.endswith(f"iter_{iteration:06d}"))
        result[name] = {"iteration": iteration, "accuracy": row["accuracy"], "accuracy_se": row.get("accuracy_se")}
    for key in CREDIT:
        values = [r[key] for r in records if key in r]
        result[key] = statistics.fmean(values) if values else None
    # The curve (cumulative RL seconds, cumulative generated tokens, training reward) per iteration: kept in the
    # results so the plot can be redrawn from them when the runs themselves are gone (seeds run in other sessions).
    seconds = tokens = 0.0
    result["curve"] = []
    for r in records:
        seconds, tokens = seconds + r["time/iteration_s"], tokens + r["tokens/generated"]
        result["curve"].append([round(seconds, 2), tokens, r["reward"]])
    return result


# What every seed of one results file must share: results measured under other settings are not comparable.
SHARED_SETTINGS = ("budget_s", "eval_problems", "jobs", "warm")


def load_results(path: Path | None, settings: dict) -> dict:
    """The results so far (`--json`, accumulated seed by seed, possibly over several sessions), or a fresh record."""
    fresh = {"settings": settings, "tokens_mark": None, "warm_start": None, "methods": {}}
    if path is None or not path.is_file():
        return fresh
    results = json.loads(path.read_text())
    differing = [k for k in SHARED_SETTINGS if results["settings"].get(k) != settings[k]]
    if differing:
        raise SystemExit(f"{path} holds results measured with other settings ({', '.join(differing)}: "
                         f"{[results['settings'].get(k) for k in differing]}); use another --json or the same settings")  # fmt: skip
    return results


def save_results(path: Path | None, results: dict) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget-s", type=float, default=420.0, help="RL seconds per run")
    # 600 problems x 4 samples: one standard error (problems fixed) under 0.01 at any accuracy.
    parser.add_argument("--eval-problems", type=int, default=600, help="held-out problems, a multiple of 4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--warm", type=Path, default=ROOT / "bench" / "assets" / "long_arith_t8",
                        help="a directory holding the shared warm_start/ (made there if missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "long_arith_learning")
    parser.add_argument("--json", type=Path, help="results file; runs already in it are kept, not rerun")
    args = parser.parse_args()
    methods = parse_methods(args.methods, METHODS)
    seeds = parse_seeds(args.seeds)
    threads = 1 if args.jobs > 1 else 2
    warm = args.warm.resolve()
    settings = {"budget_s": args.budget_s, "eval_problems": args.eval_problems, "jobs": args.jobs,
                "warm": str(warm.relative_to(ROOT) if warm.is_relative_to(ROOT) else warm)}  # fmt: skip
    results = load_results(args.json, settings)

    if not (warm / "warm_start" / "warm_start.json").is_file():
        print("warm start (once, shared by every run)", file=sys.stderr)
        spo("sft", "recipes/long_arith_grpo.yaml", f"run.output_dir={warm}", "--overwrite")
    done = results["methods"]
    runs = [(m, s, args.out / m / f"seed{s}") for s in seeds for m in methods if str(s) not in done.get(m, {})]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: train(r[0], r[1], r[2], warm, args.budget_s, threads), runs))

    if runs and results["tokens_mark"] is None:
        # Fixed by the first runs and kept for every later seed, so each seed's figure is final when measured.
        results["tokens_mark"] = min(sum(r["tokens/generated"] for r in iteration_records(d)) for _, _, d in runs)
    if results["warm_start"] is None:
        results["warm_start"] = evaluate("long_arith_grpo.yaml", [warm / "warm_start"], args.out / "warm_eval",
                                         args.eval_problems, 2)[0]  # fmt: skip
    print(f"equal sampled tokens: T = {results['tokens_mark']:.0f}", file=sys.stderr)

    def summarize(run: tuple[str, int, Path]) -> None:
        method, seed, run_dir = run
        marks = {"budget_s": args.budget_s, "tokens_mark": results["tokens_mark"]}
        summary = summarize_run(run_dir, method, marks, args.eval_problems, threads, results["warm_start"])
        done.setdefault(method, {})[str(seed)] = summary
        save_results(args.json, results)  # after every run: an interrupted benchmark keeps what it measured

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(summarize, runs))
    in_order = {m: dict(sorted(done[m].items(), key=lambda kv: int(kv[0]))) for m in METHODS if m in done}
    print_tables(in_order, results["warm_start"], results["tokens_mark"], args.budget_s)
    plot_curves(in_order, args.out / "curves.png")


def print_tables(table: dict, warm_row: dict, tokens_mark: float, budget_s: float) -> None:
    print(f"\nwarm start: sampled accuracy {warm_row['accuracy']:.3f} ± {warm_row.get('accuracy_se') or 0:.3f}")
    print(f"held-out sampled accuracy at equal wall time ({budget_s:.0f} s of RL), at equal sampled tokens "
          f"({tokens_mark / 1e6:.2f} M) and at each run's end; mean over seeds [median iterations], then each seed")  # fmt: skip
    budgets = ("time", "tokens", "final")
    print(f"{'method':<14}" + "".join(f"{b:>16}{'seeds':>24}" for b in budgets)
          + f"{'s at end':>10}{'M tokens':>10}{'misplaced':>11}{'uniform':>9}{'localized':>11}")  # fmt: skip
    for method, per_seed in table.items():
        rows = list(per_seed.values())
        line = f"{method:<14}"
        for budget in budgets:
            shown = [r[budget]["accuracy"] for r in rows]
            iters = statistics.median(r[budget]["iteration"] for r in rows)
            line += f"{statistics.fmean(shown):>10.3f} [{iters:>3.0f}]" + f"{' '.join(f'{a:.3f}' for a in shown):>24}"
        seconds = statistics.median(r["seconds"] for r in rows)
        tokens = statistics.median(r["tokens_total"] for r in rows) / 1e6
        credit = [statistics.fmean(r[k] for r in rows) if all(r[k] is not None for r in rows) else float("nan")
                  for k in CREDIT]  # fmt: skip
        print(line + f"{seconds:>10.0f}{tokens:>10.2f}" + "".join(f"{c:>10.3f} " for c in credit))


def plot_curves(table: dict, path: Path) -> None:
    """Training reward (a moving mean of 5 iterations) against RL seconds and against generated tokens, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (method, per_seed) in enumerate(table.items()):
        for k, run in enumerate(per_seed.values()):
            seconds, tokens, reward = zip(*run["curve"])
            smooth = [statistics.fmean(reward[max(0, j - 4) : j + 1]) for j in range(len(reward))]
            style = dict(color=plt.cm.tab10(i), lw=1, marker=".", ms=3)
            axes[0].plot(seconds, smooth, label=method if k == 0 else None, **style)
            axes[1].plot([t / 1e6 for t in tokens], smooth, **style)
    axes[0].set(xlabel="RL seconds", ylabel="training reward (moving mean of 5)")
    axes[1].set(xlabel="generated tokens (M)", ylabel="training reward (moving mean of 5)", xscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
