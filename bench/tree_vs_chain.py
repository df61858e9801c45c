"""Sampling cost of SPO-tree versus SPO-chain: tokens generated per trained token, on the same prompts.

One iteration of each method from the same warm-started tiny model on the same prompts of the synthetic
arithmetic task:

- chain: `--generations` responses per prompt, cutpoint segments (interval 5), `--rollouts` Monte Carlo
  continuations from every distinct boundary state;
- tree: one tree per prompt (`--branching`, `--segment-tokens` per level, the last level to the end).

"Generated" counts every token the sampler produced (responses, rollouts, tree nodes). "Trained" counts
the tokens that carry a learning signal: response tokens inside the probability mask (p_old < 0.9) with
a non-zero advantage, before any replay or repetition. Run from the repository root:

    python bench/tree_vs_chain.py                      # short warm start first (~1 min on 2 cores)
    python bench/tree_vs_chain.py --policy runs/tiny_arith_tree/warm_start
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CountingSampler:
    """Wraps a sampler and counts the tokens it generates."""

    def __init__(self, inner):
        self.inner = inner
        self.generated = 0

    def encode_prompts(self, prompts):
        return self.inner.encode_prompts(prompts)

    def generate(self, prompts, params, seed, offset=0):
        return self._count(self.inner.generate(prompts, params, seed, offset))

    def generate_ids(self, prompt_ids, params, seed, offset=0):
        return self._count(self.inner.generate_ids(prompt_ids, params, seed, offset))

    def _count(self, groups):
        self.generated += sum(len(c.token_ids) for group in groups for c in group)
        return groups


def trained_tokens(episodes, rho: float, distinct: bool = False) -> int:
    """Masked tokens with a non-zero advantage; `distinct` counts identical (prompt, response) episodes once
    (a tree's identical siblings share their subtree, so its edges repeat)."""
    from spo_cli.episode import token_advantages

    if distinct:
        episodes = list({(tuple(ep.prompt_token_ids), tuple(ep.response_token_ids)): ep for ep in episodes}.values())
    return sum(
        1
        for ep in episodes
        for lp, a in zip(ep.response_logprobs, token_advantages(ep))
        if a != 0.0 and math.exp(lp) < rho
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, help="warm-started model directory; default: a short SFT here")
    parser.add_argument("--sft-steps", type=int, default=1600)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=9)
    parser.add_argument("--branching", default="6,6,6")
    parser.add_argument("--segment-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from spo_cli.estimate import estimate_advantages
    from spo_cli.estimate.rollout import build_state_values
    from spo_cli.hardware import resolve_runtime
    from spo_cli.partition import partition_episodes
    from spo_cli.recipe import load_recipe
    from spo_cli.sample import sampling_params
    from spo_cli.sample.hf import HFSampler
    from spo_cli.policy_loading import load_policy
    from spo_cli.tasks import build_task
    from spo_cli.estimate.tree.method import sample_trees
    from spo_cli.sample.episodes import sample_episodes

    common = [f"run.seed={args.seed}", f"sampling.prompts_per_iteration={args.prompts}", f"hardware.num_threads={args.threads}"]
    chain = load_recipe(
        "recipes/tiny_arith_chain.yaml",
        [*common, f"sampling.num_generations={args.generations}", f"estimator.rollouts={args.rollouts}", f"warm_start.steps={args.sft_steps}"],
    )
    tree = load_recipe(
        "recipes/tiny_arith_tree.yaml",
        [*common, f"estimator.branching=[{args.branching}]", f"estimator.segment_tokens={args.segment_tokens}"],
    )
    runtime = resolve_runtime(chain.hardware)
    task = build_task(chain.task, args.prompts)
    model, tokenizer = load_policy(chain, args.policy, runtime)
    if args.policy is None:
        from spo_cli.sft import run_sft

        print(f"warm start: {args.sft_steps} SFT steps")
        run_sft(model, tokenizer, task, chain.warm_start, runtime, chain.run.seed, lambda *_: None)
    model.eval()
    context = model.config.max_position_embeddings
    rows = []
    try:
        # Chain: responses, cutpoints, Monte Carlo values of every distinct boundary state.
        sampler = CountingSampler(HFSampler(model, tokenizer, runtime, chain.sampling.generation_batch_size))
        t0 = time.perf_counter()
        params = sampling_params(chain.sampling, task.stop, context)
        episodes, _ = sample_episodes(sampler, tokenizer, task, chain, 1, params)
        responses = sampler.generated
        episodes = partition_episodes(episodes, chain.partitioner, tokenizer)
        state_values = build_state_values(chain, sampler, tokenizer, task, context)
        episodes, stats = estimate_advantages(episodes, chain.estimator, state_values)
        rows.append(
            ("chain int5", sampler.generated, trained_tokens(episodes, 0.9), trained_tokens(episodes, 0.9, True), time.perf_counter() - t0)
        )
        print(
            f"chain: {len(episodes)} responses ({responses} tokens), {stats['mc/unique_states']:.0f} distinct states "
            f"x {args.rollouts} rollouts ({sampler.generated - responses} tokens)"
        )

        # Tree: grow, value, keep the non-zero edges.
        sampler = CountingSampler(HFSampler(model, tokenizer, runtime, tree.sampling.generation_batch_size))
        t0 = time.perf_counter()
        params = sampling_params(tree.sampling, task.stop, context)
        nodes, tree_stats = sample_trees(sampler, tokenizer, task, tree, 1, params)
        nodes = partition_episodes(nodes, tree.partitioner, tokenizer)
        edges, stats = estimate_advantages(nodes, tree.estimator)
        name = f"tree {args.branching.replace(',', '-')}"
        rows.append((name, sampler.generated, trained_tokens(edges, 0.9), trained_tokens(edges, 0.9, True), time.perf_counter() - t0))
        print(
            f"tree: {tree_stats['tree/nodes']:.0f} nodes ({tree_stats['tree/expansions']:.0f} distinct prefixes expanded), "
            f"{stats['tree/edges_kept']:.0f} edges with a non-zero advantage"
        )
    finally:
        task.close()

    print(f"\n{'method':<14}{'generated':>11}{'trained':>9}{'gen/trained':>13}{'distinct':>10}{'gen/distinct':>14}{'seconds':>9}")
    for name, generated, trained, distinct, seconds in rows:
        ratio = generated / trained if trained else float("inf")
        ratio_d = generated / distinct if distinct else float("inf")
        print(f"{name:<14}{generated:>11}{trained:>9}{ratio:>13.2f}{distinct:>10}{ratio_d:>14.2f}{seconds:>9.1f}")
    (_, g_chain, t_chain, d_chain, s_chain), (_, g_tree, t_tree, d_tree, s_tree) = rows
    if t_chain and t_tree and d_chain and d_tree:
        print(
            f"\ntree / chain, generated tokens per trained token: {g_tree / t_tree / (g_chain / t_chain):.3f}x "
            f"(distinct edges only: {g_tree / d_tree / (g_chain / d_chain):.3f}x); wall time {s_tree / s_chain:.2f}x"
        )


if __name__ == "__main__":
    main()
