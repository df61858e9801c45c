"""Peak memory and seconds per iteration of RL on the real SmolLM2-135M model, with LoRA and with full training.

Both runs are `spo train recipes/smollm2_arith_chain.yaml` from the base model (no warm start: it would dominate
the time and is the same for both), with a KL term (`loss.beta` 0.01: full training then holds a second copy of
the model as its reference, LoRA disables its adapters instead) and every episode trained (`skip_zero_advantage`
off: the base model rarely earns a reward, and a step with nothing to train measures nothing). The recipe's
SPO-chain rollouts are swapped for GRPO's group advantages (`partitioner.kind=whole estimator.kind=group`): from
the base model, whose responses are long and uncertain, the rollouts take minutes per iteration and cost the same
in both runs, while the update, where LoRA and full training differ, takes seconds. The two runs differ only in
`lora`. Each run is its own process; its peak resident memory is the kernel's figure for that process (wait4's
ru_maxrss) and its seconds are the iterations' own times from metrics.jsonl, the first iteration left out (it
includes one-off costs). Prints both and their ratios, measured in this one invocation.

Needs the model: .ci/fetch_real_model (docs/real_model.md).

    python bench/lora_memory.py                      # 4 iterations each, ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

RECIPE = ROOT / "recipes" / "smollm2_arith_chain.yaml"
COMMON = ["warm_start.kind=none", "partitioner.kind=whole", "estimator.kind=group", "loss.beta=0.01",
          "loss.skip_zero_advantage=false", "eval.before_training=false", "eval.after_training=false",
          "logging.report_to=[]", "logging.progress=false"]  # fmt: skip
VARIANTS = {"full": ["lora=null"], "lora": []}


def run(name: str, extra: list[str], out: Path, iterations: int) -> dict:
    """Train one variant in a child process; its peak RSS (GiB) and mean iteration / optimize seconds."""
    args = [sys.executable, "-m", "spo_cli", "train", str(RECIPE), f"run.output_dir={out / name}",
            f"train.iterations={iterations}", *COMMON, *extra]  # fmt: skip
    with open(out / f"{name}.log", "w") as log:
        child = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: see {out / f'{name}.log'}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    return {
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "iteration_s": mean("time/iteration_s"),
        "optimize_s": mean("time/optimize_s"),
        "sample_s": mean("time/sample_s"),
        "estimate_s": mean("time/estimate_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4, help="per variant (the first is not counted)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (ROOT / ".cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file():
        raise SystemExit("the real model is missing: run .ci/fetch_real_model (docs/real_model.md)")
    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        results = {name: run(name, extra, Path(tmp), args.iterations) for name, extra in VARIANTS.items()}
    full, lora = results["full"], results["lora"]
    print(f"{'':10} {'peak RSS GiB':>13} {'s/iteration':>12} {'optimize s':>11} {'sample s':>9} {'estimate s':>11}")
    for name, r in results.items():
        print(f"{name:10} {r['peak_rss_gib']:13.2f} {r['iteration_s']:12.1f} {r['optimize_s']:11.1f} "
              f"{r['sample_s']:9.1f} {r['estimate_s']:11.1f}")  # fmt: skip
    print(f"LoRA / full: peak memory {lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}x, "
          f"iteration time {lora['iteration_s'] / full['iteration_s']:.2f}x, "
          f"optimize time {lora['optimize_s'] / full['optimize_s']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
