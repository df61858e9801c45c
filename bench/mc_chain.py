"""Cost of SPO-chain's Monte Carlo rollouts: spo's sampler versus a naive implementation, in one run.

Samples real trajectories from a tiny warm-started model on the synthetic arithmetic task, cuts them at
cutpoints, and values every boundary state with `rollouts` continuations twice:

- naive: every (trajectory, boundary) state on its own, each of its n rollouts prefilling the state's tokens (what
  `generate(num_return_sequences=n)` does);
- spo: identical states valued once, each state prefilled once and its KV cache branched n ways.

Both decode with spo's loop, which drops a rollout from the batch as soon as it ends.

Reports the tokens the model's forward passes processed (a hook counts `input_ids` elements, padding
included: it is computed) and the wall time of each, as ratios, and spo's tokens against the ideal: each distinct
state's tokens (prompt + prefix) once plus every continuation token once, nothing padded. Run from the repository
root:

    python bench/mc_chain.py                      # short warm start first (~1 min on 2 cores)
    python bench/mc_chain.py --policy runs/tiny_arith_chain/warm_start
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/tiny_arith_chain.yaml")
    parser.add_argument("--policy", type=Path, help="warm-started model directory; default: a short SFT here")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from spo_cli.estimate.mc_chain import boundary_states
    from spo_cli.estimate.rollout import build_state_values
    from spo_cli.hardware import resolve_runtime
    from spo_cli.partition import partition_episodes
    from spo_cli.recipe import load_recipe
    from spo_cli.sample.hf import HFSampler
    from spo_cli.policy_loading import load_policy
    from spo_cli.tasks import build_task
    from spo_cli.sample.episodes import sample_episodes

    overrides = [
        f"sampling.prompts_per_iteration={args.prompts}",
        f"sampling.num_generations={args.generations}",
        f"estimator.rollouts={args.rollouts}",
        f"hardware.num_threads={args.threads}",
        f"warm_start.steps={args.sft_steps}",
    ]
    recipe = load_recipe(args.recipe, overrides)
    runtime = resolve_runtime(recipe.hardware)
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    model, tokenizer = load_policy(recipe, args.policy, runtime)
    if args.policy is None:
        from spo_cli.sft import run_sft

        print(f"warm start: {args.sft_steps} SFT steps")
        run_sft(model, tokenizer, task, recipe.warm_start, runtime, recipe.run.seed, lambda *_: None)
    model.eval()

    from spo_cli.sample import sampling_params

    sampler = HFSampler(model, tokenizer, runtime, recipe.sampling.generation_batch_size)
    episodes, _ = sample_episodes(sampler, tokenizer, task, recipe, 1, sampling_params(recipe.sampling, task.stop))
    episodes = partition_episodes(episodes, recipe.partitioner, tokenizer)
    states = [s for ep in episodes for s in boundary_states(ep)[1]]
    unique = list(dict.fromkeys(states))
    prefix_tokens = sum(len(s.prompt_token_ids) + len(s.prefix_token_ids) for s in states)
    print(
        f"{len(episodes)} trajectories, mean {sum(len(e.response_token_ids) for e in episodes) / len(episodes):.1f} "
        f"tokens; {len(states)} boundary states ({len(unique)} distinct), mean state length "
        f"{prefix_tokens / max(len(states), 1):.1f} tokens; {args.rollouts} rollouts each"
    )

    counted = [0]
    model.register_forward_pre_hook(lambda m, a, kw: counted.__setitem__(0, counted[0] + kw["input_ids"].numel()), with_kwargs=True)

    def measure(shared_prefill: bool, batch: list) -> tuple[int, float, list[float], int]:
        values = build_state_values(
            recipe, HFSampler(model, tokenizer, runtime, recipe.sampling.generation_batch_size, shared_prefill),
            tokenizer, task, model.config.max_position_embeddings,
        )  # fmt: skip
        counted[0] = 0
        start = time.perf_counter()
        with torch.no_grad():
            v = values(batch, 1)
        return counted[0], time.perf_counter() - start, v, values.generated_tokens

    measure(True, unique[:4])  # warm-up (first-call allocations, lazy imports)
    naive_tokens, naive_s, naive_v, _ = measure(False, states)
    dedup_tokens, dedup_s, _, _ = measure(False, unique)
    ours_tokens, ours_s, ours_v, ours_generated = measure(True, unique)
    task.close()
    # The ideal for spo's own rollouts: each distinct state read once, each token its continuations sampled once.
    ideal_tokens = sum(len(s.prompt_token_ids) + len(s.prefix_token_ids) for s in unique) + ours_generated

    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    Console().print(
        f"\n| implementation | forward tokens | wall s | tokens vs naive | time vs naive |\n"
        f"| --- | --- | --- | --- | --- |\n"
        f"| naive (per trajectory state, n-fold prefill) | {naive_tokens:,} | {naive_s:.2f} | 1.00 | 1.00 |\n"
        f"| distinct states, n-fold prefill | {dedup_tokens:,} | {dedup_s:.2f} | {dedup_tokens / naive_tokens:.3f} | {dedup_s / naive_s:.3f} |\n"
        f"| spo (distinct states, shared prefill + KV branch) | {ours_tokens:,} | {ours_s:.2f} | {ours_tokens / naive_tokens:.3f} | {ours_s / naive_s:.3f} |\n"
        f"| ideal (distinct states once + continuation tokens once, no padding) | {ideal_tokens:,} | | {ideal_tokens / naive_tokens:.3f} | |\n"
        f"\nspo's forward tokens / the ideal: {ours_tokens / ideal_tokens:.3f}"
        f"\nspo computes {naive_tokens / ours_tokens:.2f}x fewer forward tokens and runs {naive_s / ours_s:.2f}x faster "
        f"than the naive implementation (mean state value {mean(naive_v):.3f} naive, {mean(ours_v):.3f} spo: "
        "different random streams, the same estimator)."
    )


if __name__ == "__main__":
    main()
