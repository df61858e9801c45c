"""GRPO in spo against TRL's GRPOTrainer: seconds per optimizer step at equal work, peak memory and where the time goes.

Both train one model on the same synthetic-arithmetic prompts, in the same order, with the same GRPO settings: P
prompts x G generations per step, T new tokens, temperature 1, one optimizer step per generation batch (one epoch,
on-policy), group-normalised rewards, PPO-clip 0.2, no KL, fp32 on CPU with the same thread count. The model is the
tiny_arith recipe's size, warm-started here by supervised learning so responses end at varied lengths, or, with
`--model-dir`, a real pretrained model (docs/real_model.md: SmolLM2-135M-Instruct).

spo runs in two regimes: `skip` (its default, `loss.skip_zero_advantage: true`: episodes whose group is all right or
all wrong add nothing to the gradient and are left out of the update) and `all` (every episode trained, as TRL
does: equal work, the case of a batch whose groups are all mixed). Runs alternate (spo skip, spo all, TRL, ...) as
child processes of this one, so a slow phase of the machine hits all three.

A step is the time between two optimizer steps, so the first step (warm-up) is left out; the table shows each run's
median and the ratios of the medians. Each run's peak resident memory is the kernel's figure for its process
(wait4's ru_maxrss). The split times the calls a step is made of, the same way in both: generation (spo's sampler,
TRL's `generate`), the training forward (log-probabilities of the completions), backward, and the optimizer step;
what is left is rewards, advantages, batching and bookkeeping.

TRL is a bench-only dependency (`pip install -e ".[bench]"`); spo never imports it. From the repository root:

    python bench/vs_trl.py                        # 3 rounds x 8 steps, 16 prompts x 8 generations x 64 tokens, ~5 min
    python bench/vs_trl.py --model-dir .cache/models/smollm2-135m-instruct --rounds 1 --steps 4
    python bench/vs_trl.py --json vs_trl.json
"""

from __future__ import annotations

import argparse
import functools
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
    """The shared model (warm-started, unless a real one is given) and the prompts of every step, in order."""
    import torch
    from rich.console import Console

    from spo_cli.hardware import Runtime
    from spo_cli.models import build_byte_tokenizer, build_tiny_model, save_model
    from spo_cli.recipe import Arith, Sft, TinyModel
    from spo_cli.sft import run_sft
    from spo_cli.tasks import build_task

    torch.set_num_threads(args.threads)
    task = build_task(Arith(), args.prompts)
    if args.model_dir is None:
        tokenizer = build_byte_tokenizer()
        model = build_tiny_model(TinyModel(**MODEL), tokenizer, seed=0)
        run_sft(model, tokenizer, task, Sft(steps=args.warm_steps, batch_size=16, learning_rate=1e-3),
                Runtime("cpu", False), seed=0, log=Console(stderr=True).print)  # fmt: skip
        save_model(model, tokenizer, work / "model")
    rows = []
    for step in range(1, args.steps + 1):
        rows += [{"question": p.question, "gold": p.gold} for p in task.train_problems(step, args.prompts, 0)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def model_dir(work: Path, args) -> Path:
    return args.model_dir.resolve() if args.model_dir is not None else work / "model"


class Split:
    """Wall time spent inside named calls, and the steps' end times (a step is the time between two)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.events.append((label, start, time.perf_counter()))

        setattr(owner, name, timed)

    def wrap_common(self) -> None:
        import torch

        self.wrap(torch.autograd, "backward", "backward")
        self.wrap(torch.optim.AdamW, "step", "optimizer")

    def mark_step_end(self) -> None:
        now = time.perf_counter()
        self.events.append(("step", now, now))

    def result(self) -> dict:
        """Seconds of every step after the first, and each label's seconds per step over them."""
        ends = [end for label, _, end in self.events if label == "step"]
        steps = [b - a for a, b in zip(ends, ends[1:])]
        parts = {
            label: sum(e - s for name, s, e in self.events if name == label and s >= ends[0]) / len(steps)
            for label in ("generation", "forward", "backward", "optimizer")
        }
        parts["other"] = sum(steps) / len(steps) - sum(parts.values())
        return {"steps": steps, "parts": parts}


def worker_spo(work: Path, args, skip: bool) -> dict:
    """Train with `spo train`'s loop in this process."""
    from rich.console import Console

    import spo_cli.optimize.step
    import spo_cli.sample.hf
    import spo_cli.train
    from spo_cli.recipe import parse_recipe
    from spo_cli.train import train

    split = Split()
    split.wrap_common()
    split.wrap(spo_cli.sample.hf.HFSampler, "generate_ids", "generation")
    split.wrap(spo_cli.optimize.step, "packed_logprobs", "forward")
    # The update ends an iteration (an iteration whose episodes all have zero advantage makes no optimizer step).
    update = spo_cli.train.ppo_update

    def update_then_mark(*a, **k):
        try:
            return update(*a, **k)
        finally:
            split.mark_step_end()

    spo_cli.train.ppo_update = update_then_mark
    n = args.prompts * args.generations
    recipe = parse_recipe({
        "run": {"name": "vs_trl", "seed": 0, "output_dir": str(work / f"spo_run_{time.time_ns()}")},
        "model": {"kind": "pretrained", "name_or_path": str(model_dir(work, args)), "dtype": "float32"},
        # run.seed 0: the arith task draws exactly the problems of prompts.jsonl, in the same order.
        "task": {"kind": "arith", "use_chat_template": True},
        "sampling": {"prompts_per_iteration": args.prompts, "num_generations": args.generations,
                     "max_completion_length": args.max_new_tokens, "temperature": 1.0},
        "partitioner": {"kind": "whole"},
        "estimator": {"kind": "group", "scale_by_std": True},
        "loss": {"kind": "ppo_clip", "epsilon": 0.2, "beta": 0.0, "skip_zero_advantage": skip},
        "optim": {"learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant"},
        "train": {"iterations": args.steps, "ppo_epochs": 1, "per_device_train_batch_size": n,
                  "gradient_accumulation_steps": 1, "save_steps": args.steps},
        "hardware": {"device": "cpu", "precision": "fp32", "num_threads": args.threads},
        "eval": {"before_training": False, "after_training": False},
        "logging": {"report_to": [], "progress": False, "log_completions": 0, "save_episodes": False},
    })  # fmt: skip
    train(recipe, console=Console(file=open(os.devnull, "w")))
    records = [json.loads(line) for line in (recipe.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    out = split.result()
    out["trained_fraction"] = statistics.median(r["trained_episodes"] / n for r in records[1:])
    return out


def worker_trl(work: Path, args) -> dict:
    """Train with TRL's GRPOTrainer in this process."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from spo_cli.tasks import gsm8k

    split = Split()
    split.wrap_common()
    split.wrap(transformers.GenerationMixin, "generate", "generation")
    split.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", "forward")
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "gold": r["gold"]} for r in rows])

    def correctness(completions, gold, **_):  # spo's arith reward: the reference "#### answer" rule
        return [gsm8k.reward(c[0]["content"], g) for c, g in zip(completions, gold)]

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
    model = AutoModelForCausalLM.from_pretrained(model_dir(work, args), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(work, args))
    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            split.mark_step_end()

    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correctness], args=config,
                          train_dataset=dataset, callbacks=[StepEnds()])  # fmt: skip
    trainer.train()
    return split.result()


def run_worker(engine: str, work: Path, args) -> dict:
    """One run in a child process: its result, and its peak resident memory."""
    command = [sys.executable, __file__, "--worker", engine, "--work", str(work), *sys.argv[1:]]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{engine} run failed:\n{err.read().decode()[-4000:]}")
        out.seek(0)
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return result


ENGINES = {"spo_skip": "spo, skip zero-advantage (default)", "spo_all": "spo, every episode", "trl": "TRL GRPOTrainer"}


def report(runs: dict[str, list[dict]], args) -> dict:
    """Print the table, the ratios and the split; return the summary."""
    medians = {e: [statistics.median(r["steps"]) for r in runs[e]] for e in runs}
    step = {e: statistics.median(m) for e, m in medians.items()}
    rss = {e: max(r["peak_rss_gib"] for r in runs[e]) for e in runs}
    what = "tiny model" if args.model_dir is None else str(args.model_dir)
    print(f"\nGRPO on {what}, {args.prompts} prompts x {args.generations} generations x {args.max_new_tokens} tokens, "
          f"{args.threads} threads, {args.rounds} alternating runs of {args.steps} steps each (the first left out)\n")  # fmt: skip
    print("| run | s/step (median of runs) | runs | peak RSS GiB | seconds per step (median run): generation | forward | "
          "backward | optimizer | other |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for engine, label in ENGINES.items():
        # The split of the run whose median step is the median run's (parts of one run add up to its step).
        run = sorted(runs[engine], key=lambda r: statistics.median(r["steps"]))[len(runs[engine]) // 2]
        print(f"| {label} | {step[engine]:.3f} | " + ", ".join(f"{m:.3f}" for m in medians[engine])
              + f" | {rss[engine]:.2f} | " + " | ".join(f"{v:.3f}" for v in run["parts"].values()) + " |")  # fmt: skip
    fraction = statistics.median(r["trained_fraction"] for r in runs["spo_skip"])
    print(f"\nTRL / spo seconds per step, every episode trained (equal work): {step['trl'] / step['spo_all']:.2f}x")
    print(f"TRL / spo seconds per step, skipping zero-advantage episodes: {step['trl'] / step['spo_skip']:.2f}x "
          f"({100 * fraction:.0f}% of episodes trained)")  # fmt: skip
    return {"seconds_per_step": step, "peak_rss_gib": rss, "runs_medians": medians, "trained_fraction_skip": fraction,
            "ratio_trl_over_spo_all": step["trl"] / step["spo_all"], "ratio_trl_over_spo_skip": step["trl"] / step["spo_skip"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warm-steps", type=int, default=300, help="supervised steps before both start (tiny model)")
    parser.add_argument("--model-dir", type=Path, help="a pretrained model directory instead of the tiny model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "trl":
            result = worker_trl(args.work, args)
        else:
            result = worker_spo(args.work, args, skip=args.worker == "spo_skip")
        print(json.dumps(result))
        return

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit('TRL is not installed: pip install -e ".[bench]"')
    with tempfile.TemporaryDirectory(prefix="spo-vs-trl-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        load_before = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for r in range(args.rounds):
            for engine in ENGINES:
                result = run_worker(engine, work, args)
                runs[engine].append(result)
                print(f"round {r + 1} {engine:>8}: {statistics.median(result['steps']):.3f} s/step", file=sys.stderr)
    summary = report(runs, args)
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("json", "worker", "work")}
        args.json.write_text(json.dumps({"settings": settings, **summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
