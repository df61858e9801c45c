"""GRPO in spo against TRL's GRPOTrainer: seconds per optimizer step on the same model, prompts and settings.

Both train one local model (the tiny_arith recipe's size, warm-started here by supervised learning so responses end
at varied lengths) on the same synthetic-arithmetic prompts, in the same order, with the same GRPO settings: P
prompts x G generations per step, T new tokens, temperature 1, one optimizer step per generation batch (one epoch,
on-policy), group-normalised rewards, PPO-clip 0.2, no KL, fp32 on CPU with the same thread count. Runs alternate
(spo, TRL, spo, TRL, ...) as child processes of this one, so a slow phase of the machine hits both. The first step
of every run (warm-up) is left out; the table shows each run's median and the ratio of the medians.

TRL is a bench-only dependency (`pip install -e ".[bench]"`); spo never imports it. From the repository root:

    python bench/vs_trl.py                        # 3 rounds x 8 steps, 16 prompts x 8 generations x 64 tokens
    python bench/vs_trl.py --profile              # and where each spends a step (cProfile of one more run each)
    python bench/vs_trl.py --json vs_trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LEARNING_RATE = 1e-5


def prepare(work: Path, args) -> None:
    """The shared model (warm-started) and the prompts of every step, in order."""
    import torch
    from rich.console import Console

    from spo_cli.hardware import Runtime
    from spo_cli.models import build_byte_tokenizer, build_tiny_model, save_model
    from spo_cli.recipe import Arith, Sft, TinyModel
    from spo_cli.sft import run_sft
    from spo_cli.tasks import build_task

    torch.set_num_threads(args.threads)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(TinyModel(**MODEL), tokenizer, seed=0)
    task = build_task(Arith(), args.prompts)
    run_sft(model, tokenizer, task, Sft(steps=args.warm_steps, batch_size=16, learning_rate=1e-3), Runtime("cpu", False),
            seed=0, log=Console(stderr=True).print)  # fmt: skip
    save_model(model, tokenizer, work / "model")
    rows = []
    for step in range(1, args.steps + 1):
        rows += [{"question": p.question, "gold": p.gold} for p in task.train_problems(step, args.prompts, 0)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def worker_spo(work: Path, args) -> tuple[list[float], dict[str, float]]:
    """Train with `spo train`'s loop in this process: per-step wall times (from metrics.jsonl) and a breakdown."""
    from rich.console import Console

    from spo_cli.recipe import parse_recipe
    from spo_cli.train import train

    n = args.prompts * args.generations
    recipe = parse_recipe({
        "run": {"name": "vs_trl", "seed": 0, "output_dir": str(work / f"spo_run_{time.time_ns()}")},
        "model": {"kind": "pretrained", "name_or_path": str(work / "model"), "dtype": "float32"},
        # run.seed 0: the arith task draws exactly the problems of prompts.jsonl, in the same order.
        "task": {"kind": "arith", "use_chat_template": True},
        "sampling": {"prompts_per_iteration": args.prompts, "num_generations": args.generations,
                     "max_completion_length": args.max_new_tokens, "temperature": 1.0},
        "partitioner": {"kind": "whole"},
        "estimator": {"kind": "group", "scale_by_std": True},
        "loss": {"kind": "ppo_clip", "epsilon": 0.2, "beta": 0.0},
        "optim": {"learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant"},
        "train": {"iterations": args.steps, "ppo_epochs": 1, "per_device_train_batch_size": n,
                  "gradient_accumulation_steps": 1, "save_steps": args.steps},
        "hardware": {"device": "cpu", "precision": "fp32", "num_threads": args.threads},
        "eval": {"before_training": False, "after_training": False},
        "logging": {"report_to": [], "progress": False, "log_completions": 0, "save_episodes": False},
    })  # fmt: skip
    train(recipe, console=Console(file=open(os.devnull, "w")))
    records = [json.loads(line) for line in (recipe.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time/loop_elapsed_s"] for r in records]
    steps = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    parts = {k: statistics.median(r[f"time/{k}_s"] for r in records[1:]) for k in ("sample", "estimate", "optimize")}
    # spo trains only on episodes with a non-zero advantage (the others add nothing to the gradient); TRL on all.
    parts["trained_fraction"] = statistics.median(r["trained_episodes"] / n for r in records[1:])
    return steps, parts


def worker_trl(work: Path, args) -> tuple[list[float], dict[str, float]]:
    """Train with TRL's GRPOTrainer in this process: per-step wall times (from a callback), no breakdown."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spo_cli.tasks import gsm8k

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "gold": r["gold"]} for r in rows])

    def correctness(completions, gold, **_):  # spo's arith reward: the reference "#### answer" rule
        return [gsm8k.reward(c[0]["content"], g) for c, g in zip(completions, gold)]

    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    n = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(work / f"trl_run_{time.time_ns()}"), use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=n, num_generations=args.generations, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, max_steps=args.steps, num_iterations=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, epsilon=0.2,
        shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False,  # TRL's default is on; spo's (hardware.gradient_checkpointing) off
        dataloader_num_workers=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correctness], args=config,
                          train_dataset=dataset, callbacks=[StepTimes()])  # fmt: skip
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])], {}


PROFILED = {
    # label: {engine: (function name, part of its file path)}
    "generate": {"spo": ("generate", "generation/utils.py"), "trl": ("generate", "generation/utils.py")},
    "rewards": {"spo": ("rewards", "spo_cli/tasks/__init__.py"), "trl": ("_calculate_rewards", "trl/")},
    "training forward (log-probs)": {"spo": ("forward_logprobs", "spo_cli/policy.py"),
                                     "trl": ("_get_per_token_logps_and_entropies", "trl/")},
    "backward": {"spo": ("backward", "torch/_tensor.py"), "trl": ("backward", "torch/_tensor.py")},
    "optimizer step": {"spo": ("_single_tensor_adam", "torch/optim/adam"), "trl": ("_single_tensor_adam", "torch/optim/adam")},
}  # fmt: skip


def profile_summary(stats_path: Path, engine: str) -> dict[str, float]:
    """Cumulative seconds of the calls a GRPO step is made of, from a cProfile dump of one run."""
    import pstats

    stats = pstats.Stats(str(stats_path))
    out = {}
    for label, by_engine in PROFILED.items():
        name, path = by_engine[engine]
        out[label] = max(
            (cumulative for (file, _, func), (_, _, _, cumulative, _) in stats.stats.items() if func == name and path in file),
            default=0.0,
        )
    out["total"] = max(c for (_, _, _, c, _) in stats.stats.values())
    return out


def run_worker(engine: str, work: Path, args, profile: Path | None = None) -> dict:
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += [__file__, "--worker", engine, "--work", str(work), *sys.argv[1:]]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warm-steps", type=int, default=300, help="supervised steps before both start")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile one run of each")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--worker", choices=["spo", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        steps, parts = (worker_spo if args.worker == "spo" else worker_trl)(args.work, args)
        print(json.dumps({"steps": steps, "parts": parts}))
        return

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit('TRL is not installed: pip install -e ".[bench]"')
    with tempfile.TemporaryDirectory(prefix="spo-vs-trl-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        load_before = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {"spo": [], "trl": []}
        for r in range(args.rounds):
            for engine in ("spo", "trl"):
                result = run_worker(engine, work, args)
                runs[engine].append(result)
                median = statistics.median(result["steps"][1:])
                print(f"round {r + 1} {engine:>3}: {median:.3f} s/step (steps 2..{args.steps})", file=sys.stderr)
        profiles = {}
        if args.profile:
            for engine in ("spo", "trl"):
                run_worker(engine, work, args, profile=work / f"{engine}.prof")
                profiles[engine] = profile_summary(work / f"{engine}.prof", engine)
    medians = {e: [statistics.median(run["steps"][1:]) for run in runs[e]] for e in runs}
    spo_s, trl_s = statistics.median(medians["spo"]), statistics.median(medians["trl"])
    print(f"\nGRPO, {args.prompts} prompts x {args.generations} generations x {args.max_new_tokens} tokens, "
          f"{args.threads} threads, {args.rounds} alternating runs of {args.steps} steps each")  # fmt: skip
    print(f"{'':>6} {'s/step (median of runs)':>24}  runs")
    for engine, value in (("spo", spo_s), ("TRL", trl_s)):
        print(f"{engine:>6} {value:>24.3f}  " + ", ".join(f"{m:.3f}" for m in medians[engine.lower()]))
    print(f"TRL / spo seconds per step: {trl_s / spo_s:.2f}x")
    parts = runs["spo"][-1]["parts"]
    print("spo step breakdown (median): " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items() if k != "trained_fraction")
          + f"; episodes trained on: {100 * parts['trained_fraction']:.0f}% (those with a non-zero advantage)")
    for engine, summary in profiles.items():
        print(f"{engine} profile (cumulative s over the run): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "work")},
            "seconds_per_step": {"spo": medians["spo"], "trl": medians["trl"]},
            "ratio_trl_over_spo": trl_s / spo_s, "spo_parts": parts, "profiles": profiles,
            "runs": runs,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
