"""What segment-level credit assignment costs outside the model: partition and advantage math per 1M response tokens,
and its share of a training iteration.

Part 1 times the partition and estimate stages on a synthetic batch of 1M response tokens (random log-probs with a
realistic share of low-probability tokens, groups of 8, rewards 0/1), given the state values a Monte Carlo or critic
pass would supply, so only spo's own bookkeeping and math are measured: the stages as `spo train` calls them (on
`Episode` records) and the pure functions under them. Best of `--repeats`.

Part 2 runs the tiny_arith GRPO and SPO-chain recipes for a few iterations and sets the measured per-token cost of
their partition + advantage math against their iteration time.

    python bench/overhead.py                       # ~3 min on 2 cores
    python bench/overhead.py --json overhead.json --iterations 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def synthetic_episodes(count: int, length: int, seed: int = 0):
    """`count` responses of `length` tokens: 15% of tokens sampled with p < 0.9 (log-probs and entropies to match)."""
    from spo_cli.episode import Episode

    rng = random.Random(seed)
    episodes = []
    for i in range(count):
        low = [rng.random() < 0.15 for _ in range(length)]
        logprobs = [-rng.uniform(0.11, 3.0) if x else -rng.uniform(0.0, 0.05) for x in low]
        entropies = [rng.uniform(0.5, 2.5) if x else rng.uniform(0.0, 0.2) for x in low]
        episodes.append(Episode(
            id=f"e{i}", group_id=f"g{i // 8}", iteration=1, prompt="p", response="r", gold="7",
            prompt_token_ids=[1, 2, 3], response_token_ids=[rng.randrange(3, 250) for _ in range(length)],
            response_logprobs=logprobs, response_entropies=entropies, finish_reason="stop",
            reward=float(rng.random() < 0.5),
        ))  # fmt: skip
    return episodes


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def part1(args) -> dict[str, float]:
    from spo_cli.estimate import chain_token_advantages, estimate_advantages, gae_advantages, group_advantages
    from spo_cli.models import build_byte_tokenizer
    from spo_cli.partition import cutpoint_boundaries, partition_episodes
    from spo_cli.recipe import Cutpoint, Entropy, FixedTokens, Group, McChain, SegmentGae, Step, Whole

    episodes = synthetic_episodes(args.episodes, args.length)
    tokens = args.episodes * args.length
    per_million = 1e6 / tokens
    tokenizer = build_byte_tokenizer()
    out: dict[str, float] = {}

    def constant_values(states, iteration):  # what the Monte Carlo rollouts would return
        return [0.5] * len(states)

    parted = {}
    for name, spec in [("whole", Whole()), ("cutpoint", Cutpoint()), ("fixed_tokens", FixedTokens()),
                       ("entropy", Entropy()), ("step", Step())]:  # fmt: skip
        out[f"stage/partition/{name}"] = per_million * best_of(
            args.repeats, lambda spec=spec, name=name: parted.__setitem__(name, partition_episodes(episodes, spec, tokenizer))
        )
        print(f"partition {name}: {out[f'stage/partition/{name}']:.2f} s per 1M tokens", file=sys.stderr)
    for name, spec, source, values in [
        ("group", Group(), "whole", None),
        ("mc_chain", McChain(), "cutpoint", constant_values),
        ("segment_gae (no critic)", SegmentGae(critic=None), "entropy", None),
    ]:
        out[f"stage/estimate/{name}"] = per_million * best_of(
            args.repeats, lambda spec=spec, source=source, values=values: estimate_advantages(parted[source], spec, values)
        )
        print(f"estimate {name}: {out[f'stage/estimate/{name}']:.2f} s per 1M tokens", file=sys.stderr)

    logprobs = [ep.response_logprobs for ep in episodes]
    rewards = [ep.reward for ep in episodes]
    bounds = [cutpoint_boundaries(lp) for lp in logprobs]
    out["math/cutpoint_boundaries"] = per_million * best_of(args.repeats, lambda: [cutpoint_boundaries(lp) for lp in logprobs])
    out["math/chain_token_advantages"] = per_million * best_of(args.repeats, lambda: [
        chain_token_advantages(lp, b, [0.5] * len(b), r) for lp, b, r in zip(logprobs, bounds, rewards)])  # fmt: skip
    out["math/group_advantages"] = per_million * best_of(
        args.repeats, lambda: group_advantages(rewards, [ep.group_id for ep in episodes])
    )
    values = [[0.5] * args.length for _ in episodes]
    steps = [[0.0] * (args.length - 1) + [r] for r in rewards]
    out["math/gae_advantages"] = per_million * best_of(
        args.repeats, lambda: [gae_advantages(s, v, 1.0, 0.95) for s, v in zip(steps, values)]
    )
    return out


def part2(args, costs: dict[str, float]) -> dict[str, dict[str, float]]:
    """Iteration times of two real recipes, and what their partition + estimate math would cost at their token counts."""
    from rich.console import Console

    from spo_cli.recipe import load_recipe
    from spo_cli.train import train

    # Per-token cost of each recipe's own math (stage-level, as the loop calls it).
    math_cost = {
        "tiny_arith_grpo": costs["stage/partition/whole"] + costs["stage/estimate/group"],
        "tiny_arith_chain": costs["stage/partition/cutpoint"] + costs["stage/estimate/mc_chain"],
    }
    shares = {}
    with tempfile.TemporaryDirectory(prefix="spo-overhead-") as tmp:
        for name, per_million in math_cost.items():
            recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", [
                f"run.output_dir={tmp}/{name}", f"train.iterations={args.iterations}", "warm_start.steps=300",
                "eval.before_training=false", "eval.after_training=false", "logging.progress=false",
            ])  # fmt: skip
            train(recipe, console=Console(file=open(os.devnull, "w")))
            records = [json.loads(line) for line in (recipe.run.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            n = recipe.sampling.prompts_per_iteration * recipe.sampling.num_generations
            tokens = statistics.median(r["completions/mean_length"] * n for r in records)
            iteration_s = statistics.median(r["time/iteration_s"] for r in records)
            estimate_s = statistics.median(r["time/estimate_s"] for r in records)
            math_s = tokens * per_million / 1e6
            shares[name] = {
                "response_tokens_per_iteration": tokens, "iteration_s": iteration_s, "estimate_stage_s": estimate_s,
                "partition_and_advantage_math_s": math_s, "share_of_iteration": math_s / iteration_s,
            }  # fmt: skip
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=4096)
    parser.add_argument("--length", type=int, default=256, help="tokens per response (episodes x length = 1M by default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5, help="iterations of each real recipe in part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    costs = part1(args)
    shares = part2(args, costs)
    print(f"\nPart 1: seconds per 1M response tokens ({args.episodes} responses x {args.length} tokens, best of {args.repeats})")
    for key, value in costs.items():
        print(f"  {key:<40} {value:8.3f}")
    print("\nPart 2: share of a training iteration (tiny_arith recipes, medians over iterations 2..)")
    for name, s in shares.items():
        print(f"  {name:<18} {s['response_tokens_per_iteration']:7.0f} tokens/iteration, iteration {s['iteration_s']:.2f} s, "
              f"partition + advantage math {1000 * s['partition_and_advantage_math_s']:.1f} ms "
              f"= {100 * s['share_of_iteration']:.2f}% of it (estimate stage incl. rollouts: {s['estimate_stage_s']:.2f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "per_million_tokens_s": costs,
                                         "share": shares}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
