"""How many RL iterations CI's end-to-end tests need: the evaluation noise of the shared tiny_arith warm start, and
each method's held-out sampled accuracy by iteration from it.

tests/integration/test_main_job.py runs the README's GRPO job in full and five other methods for fewer iterations
from one shared warm start; each must raise held-out sampled accuracy by more than the evaluation's own noise. This
prints the figures those iteration counts and the margin were chosen from (recorded in the test's docstring):

1. Evaluation noise: the warm start's sampled accuracy (the recipes' 600 held-out problems, `--eval-samples` samples
   each) under `--noise-seeds` evaluation seeds. A policy that RL did not change scores within this spread of its
   own "before".
2. For each method, the first `--iterations` iterations of its shipped recipe from that warm start
   (`warm_start.load_from`, the schedule of the shipped run), evaluated every `--eval-every`; the seconds its
   iterations took.

    python bench/ci_margins.py                                    # ~20 min on 2 cores
    python bench/ci_margins.py --methods chain,ppo --iterations 20 --json bench/results/ci_margins.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import ROOT, parse_methods, spo
METHODS = {
    "chain": "tiny_arith_chain.yaml",
    "tree": "tiny_arith_tree.yaml",
    "ppo": "tiny_arith_ppo.yaml",
    "segment_gae": "tiny_arith_segment_gae.yaml",
    "single_stream": "tiny_arith_single_stream.yaml",
    "grpo": "tiny_arith_grpo.yaml",
}



def evaluation_noise(warm: Path, seeds: int, samples: int) -> list[float]:
    """Sampled held-out accuracy of the saved warm start under `seeds` evaluation seeds (the recipes' settings but
    `samples` responses per problem)."""
    from spo_cli.evaluate import evaluate_policy
    from spo_cli.hardware import resolve_runtime
    from spo_cli.models import load_checkpoint
    from spo_cli.recipe import load_recipe
    from spo_cli.sample import build_sampler
    from spo_cli.tasks import build_task
    from spo_cli.seeding import derive_seed

    recipe = load_recipe(ROOT / "recipes" / "tiny_arith_grpo.yaml", ["eval.greedy=false", f"eval.num_samples={samples}"])
    runtime = resolve_runtime(recipe.hardware)
    model, tokenizer = load_checkpoint(warm)
    sampler = build_sampler(recipe.sampling, model.to(runtime.device), tokenizer, runtime)
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    try:
        problems = task.eval_problems()
        return [
            evaluate_policy(
                sampler, tokenizer, task, problems, recipe.eval, recipe.sampling.max_completion_length,
                seed=derive_seed(seed, "eval"),
            )["eval/sampled_accuracy"]  # fmt: skip
            for seed in range(seeds)
        ]
    finally:
        task.close()


def method_curve(method: str, warm: Path, out: Path, iterations: int, eval_every: int, samples: int) -> dict:
    from spo_cli.recipe import load_recipe

    run = out / f"{method}_{samples}samples"
    shipped = load_recipe(ROOT / "recipes" / METHODS[method])
    span = shipped.optim.schedule_iterations or shipped.train.iterations
    if not (run / "summary.json").is_file():
        start = time.perf_counter()
        spo("train", f"recipes/{METHODS[method]}", f"warm_start.load_from={warm}", f"run.output_dir={run}",
            f"train.iterations={iterations}", f"eval.eval_steps={eval_every}", "eval.greedy=false",
            f"eval.num_samples={samples}", f"optim.schedule_iterations={span}",
            "logging.progress=false", "--overwrite")  # fmt: skip
        (run / "bench_wall_s.json").write_text(json.dumps(time.perf_counter() - start))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    curve = {0: summary["eval_before"]["sampled_accuracy"]}
    curve |= {r["iteration"]: r["eval/sampled_accuracy"] for r in rows if "eval/sampled_accuracy" in r}
    curve[summary["iterations"]] = summary["eval_after"]["sampled_accuracy"]
    seconds = sum(r["time/iteration_s"] for r in rows)
    return {"accuracy": curve, "iteration_s": seconds / len(rows), "wall_s": json.loads((run / "bench_wall_s.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="chain,tree,ppo,segment_gae,single_stream")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--noise-seeds", type=int, default=6)
    parser.add_argument("--eval-samples", type=int, default=16, help="sampled responses per held-out problem")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "ci_margins")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    methods = parse_methods(args.methods, METHODS)

    warm = (args.out / "warm" / "warm_start").resolve()
    if not (warm / "warm_start.json").is_file():
        print("warm start (once, shared by every run)", file=sys.stderr)
        start = time.perf_counter()
        spo("sft", "recipes/tiny_arith_grpo.yaml", f"run.output_dir={warm.parent}", "--overwrite")
        print(f"warm start: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    start = time.perf_counter()
    noise = evaluation_noise(warm, args.noise_seeds, args.eval_samples)
    eval_s = (time.perf_counter() - start) / len(noise)
    sd = statistics.stdev(noise)
    print(f"\nwarm start, sampled accuracy ({args.eval_samples} samples per problem) under {len(noise)} evaluation seeds: "
          f"{' '.join(f'{a:.4f}' for a in noise)}")  # fmt: skip
    print(f"mean {statistics.mean(noise):.4f}, sd {sd:.4f}; a rise of two independent evaluations has sd "
          f"{sd * 2 ** 0.5:.4f}; {eval_s:.1f} s per evaluation")  # fmt: skip

    curves = {}
    for method in methods:
        curves[method] = method_curve(method, warm, args.out, args.iterations, args.eval_every, args.eval_samples)
        print(f"{method}: {curves[method]['wall_s']:.0f} s", file=sys.stderr)
    steps = sorted({i for c in curves.values() for i in c["accuracy"]})
    print(f"\nheld-out sampled accuracy (600 problems x {args.eval_samples} samples) by iteration, from the shared warm start")
    print(f"{'method':<14}{'s/iter':>8}{'run s':>8}" + "".join(f"{s:>8}" for s in steps))
    for method, c in curves.items():
        cells = "".join(f"{c['accuracy'][s]:>8.3f}" if s in c["accuracy"] else f"{'':>8}" for s in steps)
        print(f"{method:<14}{c['iteration_s']:>8.2f}{c['wall_s']:>8.0f}{cells}")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"out": str(args.out), "json": None},
            "noise": {"accuracies": noise, "sd": sd, "eval_s": eval_s},
            "methods": curves,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
