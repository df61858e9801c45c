"""Which layout of the update's forward and backward pass is fastest here: the figures behind `pack`.

One GRPO-shaped batch (P prompts x G responses, lengths drawn at random in the given ranges) goes through the
update's forward and backward pass (log-probabilities of every response token, a token-mean loss) in each layout:

- padded: right-padded rows, one per episode, logits at every position (spo's update before `pack`; what most
  trainers do), micro-batches of `--micro` episodes in shuffled order;
- padded rows, response logits: the same rows, the LM head only where a response token is predicted;
- shared prompts: `pack`'s rows, each prompt once with its responses, micro-batches of `--micro` episodes grouped
  by prompt (what `spo train` does by default);
- shared prompts by tokens: the same, micro-batches cut at `--budgets` packed tokens
  (`train.max_tokens_per_micro_batch`).

All layouts compute the same log-probabilities and gradient (tests/unit/optimize/test_packed_update.py). Prints
seconds per pass (median of `--repeats` rounds over all layouts, after a warm-up), forward positions computed,
and each layout's time as a ratio to the padded one, all measured in this one run. From the repository root:

    python bench/update_layout.py                                   # the tiny model of bench/vs_trl.py, ~1 min
    python bench/update_layout.py --model-dir .cache/models/smollm2-135m-instruct --prompts 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def load_model(args):
    import torch

    if args.model_dir is None:
        from spo_cli.models import build_byte_tokenizer, build_tiny_model
        from spo_cli.recipe import TinyModel

        tokenizer = build_byte_tokenizer()
        return build_tiny_model(TinyModel(**TINY), tokenizer, seed=0), tokenizer.pad_token_id
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return model, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def make_batch(args, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(0)
    prompts, responses = [], []
    lo, hi = args.prompt_tokens
    rlo, rhi = args.response_tokens
    for _ in range(args.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
        for _ in range(args.generations):
            prompts.append(prompt)
            responses.append([rng.randrange(3, vocab) for _ in range(rng.randint(rlo, rhi))])
    return prompts, responses


def micro_batches(prompts, responses, per_micro: int, budget: int | None, grouped: bool) -> list[list[int]]:
    """The update's own cut (`mini_batch_plan`): one mini-batch of every episode, shuffled as the loop shuffles."""
    from spo_cli.optimize.step import PromptLayout, mini_batch_plan
    from spo_cli.recipe import Train

    n = len(prompts)
    train = Train(per_device_train_batch_size=per_micro, gradient_accumulation_steps=-(-n // per_micro),
                  max_tokens_per_micro_batch=budget)  # fmt: skip
    layout = PromptLayout([tuple(p) for p in prompts], [len(p) for p in prompts], [len(r) for r in responses], grouped)
    plan = mini_batch_plan([1] * n, [0] * n, train, "token_mean", 0, 1, random.Random(0), layout)
    assert len(plan) == 1
    return [m.indices for m in plan[0].micro_batches]


def one_pass(model, prompts, responses, cuts, layout: str, pad_id: int) -> int:
    """Forward and backward over every micro-batch; returns the forward positions computed."""
    from spo_cli.policy import collate, forward_logprobs, pack, packed_logprobs

    total = sum(len(r) for r in responses)
    positions = 0
    for idx in cuts:
        p, r = [prompts[i] for i in idx], [responses[i] for i in idx]
        if layout == "padded":
            batch = collate(p, r, pad_id)
            logprobs, _ = forward_logprobs(model, batch, 1.0)
            positions += batch.input_ids.numel()
        else:
            batch = pack(p, r, pad_id, shared_prompts=layout != "padded_rows")
            logprobs, _ = packed_logprobs(model, batch, 1.0)
            positions += batch.tokens
        (-(logprobs * batch.response_mask).sum() / total).backward()
    model.zero_grad(set_to_none=True)
    return positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a pretrained model directory instead of the tiny model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(80, 120), metavar=("MIN", "MAX"))
    parser.add_argument("--response-tokens", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--micro", type=int, default=8, help="episodes per micro-batch")
    parser.add_argument("--budgets", type=int, nargs="*", default=[2048, 8192], help="packed tokens per micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, pad_id = load_model(args)
    model.train()
    prompts, responses = make_batch(args, model.config.vocab_size)
    n = len(prompts)
    configs = [
        (f"padded, logits everywhere, {args.micro} episodes shuffled", "padded", args.micro, None, False),
        (f"padded rows, response logits, {args.micro} episodes shuffled", "padded_rows", args.micro, None, False),
        (f"shared prompts, {args.micro} episodes grouped by prompt", "shared", args.micro, None, True),
        (f"shared prompts, all {n} episodes in one", "shared", n, None, True),
        *[(f"shared prompts, <= {b} tokens", "shared", n, b, True) for b in args.budgets],
    ]
    cuts = [micro_batches(prompts, responses, per_micro, budget, grouped) for _, _, per_micro, budget, grouped in configs]
    positions = [one_pass(model, prompts, responses, c, config[1], pad_id) for c, config in zip(cuts, configs)]  # warm-up
    times: list[list[float]] = [[] for _ in configs]
    # Round-robin over the layouts, so a slow phase of the machine hits all of them.
    for _ in range(args.repeats):
        for k, config in enumerate(configs):
            start = time.perf_counter()
            one_pass(model, prompts, responses, cuts[k], config[1], pad_id)
            times[k].append(time.perf_counter() - start)
    results = [(config[0], len(c), pos, statistics.median(t)) for config, c, pos, t in zip(configs, cuts, positions, times)]
    what = "tiny model" if args.model_dir is None else str(args.model_dir)
    print(f"\nForward + backward of {args.prompts} prompts x {args.generations} responses on {what}: prompts of "
          f"{args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, responses of {args.response_tokens[0]}-"
          f"{args.response_tokens[1]} ({sum(map(len, responses))} response tokens), {args.threads} threads, "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| layout | micro-batches | forward positions | s per pass | time vs padded |")
    print("| --- | --- | --- | --- | --- |")
    base = results[0][3]
    for label, count, positions, seconds in results:
        print(f"| {label} | {count} | {positions:,} | {seconds:.3f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
