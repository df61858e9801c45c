"""Ground-truth credit of every estimator on the same saved episodes of the long-chain testbed: the cleanest
comparison of credit assignment itself, since only the estimator differs.

The episodes are one iteration of responses sampled by a warm start on a task that knows each wrong response's first
error (by default 64 prompts x 8 responses from the warm start of bench/long_arith_testbed.py's candidate T8, the
settings the recipes hold, sampled by

    spo train recipes/long_arith_grpo.yaml run.output_dir=bench_runs/long_arith_testbed/T8-credit run.seed=1 \
        warm_start.load_from=bench/assets/long_arith_t8/warm_start train.iterations=1 \
        sampling.prompts_per_iteration=64 eval.before_training=false eval.after_training=false

). Each
estimator re-partitions them with `spo partition` and estimates their advantages with `spo estimate-values` (Monte
Carlo rollouts from the same warm start), and the credit metrics of the result are printed (spo_cli/credit.py):
misplaced blame (share of the negative advantage before the first wrong token; uniform = the share of tokens there),
localization (the most negative segment holds the first wrong token) and the blamed span.

Estimators that need more than the episodes are left out here and measured in the training loop instead: gae and
segment_gae with a critic (a critic's values mean something only after training with the run), mc_tree (it samples
its own trees) and single_stream (its baseline is the run's tracker; one advantage per response, like GRPO).

    python bench/credit_offline.py --json bench/results/credit_offline.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from common import ROOT, spo
RECIPE = "recipes/long_arith_chain.yaml"
# name -> overrides of RECIPE (the task, model and sampling settings are the testbed's in every one).
# Estimators whose advantages for a response depend on that response alone (its own Monte Carlo state values and
# reward) are run on the wrong responses only: the metrics read nothing else, and the rollouts of right responses
# would only cost time. The group baselines need whole groups and get every response.
PER_RESPONSE = ("vineppo (lines)", "mc_chain int2", "mc_chain int5", "mc_chain int10")
ESTIMATORS = {
    "group (GRPO)": ["partitioner.kind=whole", "estimator.kind=group"],
    "rloo": ["partitioner.kind=whole", "estimator.kind=rloo"],
    "segment_gae, no critic": ["partitioner.kind=entropy", "partitioner.percentile=0.15", "estimator.kind=segment_gae",
                               "estimator.critic=null"],
    "vineppo (lines)": ["partitioner.kind=step", "estimator.kind=vineppo", "estimator.rollouts=9"],
    "mc_chain int2": ["partitioner.interval=2"],
    "mc_chain int5": ["partitioner.interval=5"],
    "mc_chain int10": ["partitioner.interval=10"],
}  # fmt: skip
SHOWN = ("credit/misplaced_blame", "credit/uniform_blame", "credit/localization", "credit/blamed_span",
         "credit/blamed_share", "credit/wrong_responses")  # fmt: skip



def main() -> None:
    from spo_cli.credit import credit_metrics
    from spo_cli.episode import read_episodes, write_episodes

    testbed = ROOT / "bench_runs" / "long_arith_testbed"  # T8: the recipes' settings
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=Path, default=testbed / "T8-credit" / "episodes" / "iter_000001.jsonl")
    parser.add_argument("--policy", type=Path, default=ROOT / "bench" / "assets" / "long_arith_t8" / "warm_start")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_runs" / "credit_offline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wrong = args.out / "wrong.jsonl"
    write_episodes(wrong, [ep for ep in read_episodes(args.episodes) if ep.first_error is not None])
    rows = {}
    print(f"{'estimator':<24}" + "".join(f"{k.removeprefix('credit/'):>16}" for k in SHOWN))
    for name, overrides in ESTIMATORS.items():
        stem = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        parted, estimated = args.out / f"{stem}.parted.jsonl", args.out / f"{stem}.jsonl"
        episodes_in = wrong if name in PER_RESPONSE else args.episodes
        spo("partition", RECIPE, *overrides, "--in", str(episodes_in), "--out", str(parted), "--policy", str(args.policy))
        spo("estimate-values", RECIPE, *overrides, "--in", str(parted), "--out", str(estimated),
            "--policy", str(args.policy))  # fmt: skip
        episodes = read_episodes(estimated)
        rows[name] = {"overrides": overrides, **credit_metrics(episodes),
                      "segments_per_response": sum(len(ep.segments) for ep in episodes) / len(episodes)}  # fmt: skip
        print(f"{name:<24}" + "".join(f"{rows[name].get(k, float('nan')):>16.3f}" for k in SHOWN))
    if args.json:
        args.json.write_text(json.dumps({"episodes": str(args.episodes.relative_to(ROOT) if args.episodes.is_relative_to(ROOT) else args.episodes),
                                         "estimators": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
