"""The long-chain testbed's criteria, measured for each candidate configuration (recipes/README.md, "The long-chain
testbed"). A configuration qualifies when its warm start has

- held-out sampled accuracy between 30% and 70% (at the recipe's sampling temperature),
- responses of 100+ tokens on average,
- at least 3 segments per response on average under the cutpoint partitioner (rho 0.9) at the interval the chain
  recipe uses. The script fixed interval 5 (the reference's default) and reports 2 and 10 beside it; no candidate
  met interval 5, and the recipes use interval 2 on T8 (recipes/README.md says why). "qualifies" is at interval 5.

The candidates are fixed here, in the order they are tried, before any method is compared; the first that
qualifies is the testbed, and every one that ran is reported. Each candidate is `recipes/long_arith_grpo.yaml` with
overrides: its warm start (`spo sft`), one RL iteration from it with cutpoint segments (the iteration's sampled
responses are the warm start's: statistics are taken before the update), and `spo partition` of those responses
at the other intervals.

    python bench/long_arith_testbed.py                    # every candidate: ~10-40 min each on 2 cores
    python bench/long_arith_testbed.py --only T1 --json bench/results/long_arith_testbed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, spo
BASE = "recipes/long_arith_grpo.yaml"
# Every candidate spells out the settings it varies, so it means the same whatever the base recipe now holds.
TWO_DIGITS = ["task.max_val=99", "task.max_add=20", "task.max_start=20"]
THREE_DIGITS = ["task.max_val=999", "task.max_add=200", "task.max_start=200"]
OPENERS = "task.step_openers=['So ', 'Then ', 'Now ', '']"
CANDIDATES = {
    # 6-12 steps over 0..99, the tiny_arith warm start's length (1600 steps).
    "T1": [*TWO_DIGITS, "warm_start.steps=1600", "sampling.temperature=1.0", "eval.temperature=1.0"],
    # A shorter warm start, should T1's be too accurate.
    "T2": [*TWO_DIGITS, "warm_start.steps=800", "sampling.temperature=1.0", "eval.temperature=1.0"],
    # Three-digit values (harder lines, longer responses), should T1 be too short or too easy.
    "T3": [*THREE_DIGITS, "warm_start.steps=1600", "sampling.temperature=1.0", "eval.temperature=1.0"],
    # Added after T1-T3 ran, before any method was compared. T1 was too accurate, short and near-deterministic; T2
    # and T3 far too inaccurate. Three-digit values with twice the warm start: the tiny model may then plateau
    # below perfect on the harder lines, rather than sit on the warm start's sharp transition (T1 vs T2).
    "T5": [*THREE_DIGITS, "warm_start.steps=3200", "sampling.temperature=1.0", "eval.temperature=1.0"],
    # T5 met the accuracy (0.36) and length (107 tokens) criteria, but its confident errors left 2.0 segments at
    # int5: the same warm start sampled (and evaluated) at temperature 1.2, for more uncertain forks.
    "T6": [*THREE_DIGITS, "warm_start.steps=3200", "sampling.temperature=1.2", "eval.temperature=1.2"],
    # T1-T6 show the criteria in tension on a task with one correct path: every token below rho 0.9 leaves >= 10%
    # of its mass on a wrong continuation, so the >= 10 such tokens that 3 segments at int5 need make a right answer
    # unlikely (about 0.9^10 = 0.35 at best). Real reasoning escapes this through forks that are never wrong
    # (phrasing). T7 is T5 with such forks: each worked line of the warm-start solutions opens with one of four
    # openers drawn uniformly (task.step_openers), a fork at each line start the task's first_error accepts.
    "T7": [*THREE_DIGITS, "warm_start.steps=3200", OPENERS, "sampling.temperature=1.0", "eval.temperature=1.0"],
    # Fixed with T7, before it ran: should T7's accuracy fall outside 30-70%, the warm start is made longer (below
    # 30%) or shorter (above 70%) by half.
    "T8-longer": [*THREE_DIGITS, "warm_start.steps=4800", OPENERS, "sampling.temperature=1.0", "eval.temperature=1.0"],
    "T8-shorter": [*THREE_DIGITS, "warm_start.steps=1600", OPENERS, "sampling.temperature=1.0", "eval.temperature=1.0"],
}
# Candidates that differ only in sampling settings start from another's warm start (the same settings make the same).
WARM_FROM = {"T6": "T5"}
INTERVALS = (2, 5, 10)
CRITERIA = {"accuracy": (0.30, 0.70), "mean_tokens": 100.0, "segments_int5": 3.0}



def measure(name: str, overrides: list[str], out: Path) -> dict:
    from spo_cli.episode import read_episodes

    warm, run = out / WARM_FROM.get(name, name) / "warm", out / name / "run"
    if not (warm / "warm_start" / "warm_start.json").is_file():
        spo("sft", BASE, *overrides, f"run.output_dir={warm}", "--overwrite")
    if not (run / "summary.json").is_file():
        spo("train", BASE, *overrides, f"run.output_dir={run}", f"warm_start.load_from={warm / 'warm_start'}",
            "train.iterations=1", "partitioner.kind=cutpoint", "partitioner.rho=0.9", "partitioner.interval=5",
            "eval.after_training=false", "logging.progress=false", "--overwrite")  # fmt: skip
    before = json.loads((run / "eval_before.json").read_text())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    sampled = run / "episodes" / "iter_000001.jsonl"
    segments = {}
    for interval in INTERVALS:
        parted = out / name / f"int{interval}.jsonl"
        spo("partition", BASE, *overrides, "partitioner.kind=cutpoint", "partitioner.rho=0.9",
            f"partitioner.interval={interval}", "--in", str(sampled), "--out", str(parted))  # fmt: skip
        episodes = read_episodes(parted)
        segments[f"int{interval}"] = sum(len(ep.segments) for ep in episodes) / len(episodes)
    row = {
        "overrides": overrides,
        "accuracy": before["eval/sampled_accuracy"],
        "accuracy_se": before.get("eval/sampled_accuracy_se"),
        "mean_tokens": first["completions/mean_length"],
        "clipped_ratio": first["completions/clipped_ratio"],
        "train_reward": first["reward"],
        "entropy": first.get("entropy"),
        "segments": segments,
        "credit/wrong_responses": first.get("credit/wrong_responses"),
    }
    lo, hi = CRITERIA["accuracy"]
    row["qualifies"] = (
        lo <= row["accuracy"] <= hi
        and row["mean_tokens"] >= CRITERIA["mean_tokens"]
        and segments["int5"] >= CRITERIA["segments_int5"]
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated candidates; default: in order until one qualifies")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "long_arith_testbed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    rows = {}
    for name in names:
        rows[name] = measure(name, CANDIDATES[name], args.out)
        r = rows[name]
        print(
            f"{name}: sampled accuracy {r['accuracy']:.3f} ± {r['accuracy_se'] or 0:.3f}, {r['mean_tokens']:.0f} tokens "
            f"(clipped {r['clipped_ratio']:.2f}), segments " + ", ".join(f"{k} {v:.1f}" for k, v in r["segments"].items())
            + f", entropy {r['entropy'] or 0:.3f}: " + ("qualifies" if r["qualifies"] else "does not qualify")
        )
        if r["qualifies"] and not args.only:
            break
    if args.json:
        # Candidates not run this time keep the rows an earlier run wrote (each takes ~10-40 min on 2 cores).
        earlier = json.loads(args.json.read_text())["candidates"] if args.json.is_file() else {}
        merged = {name: rows.get(name, earlier.get(name)) for name in CANDIDATES if name in rows or name in earlier}
        args.json.write_text(json.dumps({"criteria": CRITERIA, "base": BASE, "candidates": merged}, indent=2) + "\n")


if __name__ == "__main__":
    main()
