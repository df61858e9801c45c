"""The training loop: sample -> partition -> estimate -> optimize, with evaluation and checkpoints.

This is the only module that knows the order of the stages. What an estimator does at each of them (how it
samples, estimates, assembles its training set, what it keeps between iterations) is its method object's
(`spo_cli.estimate.method`): the loop has no branch on an estimator's kind. Every random stream is derived from
(run.seed, stage, iteration), so a resumed run samples and shuffles exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from spo_cli.checkpoint import latest_checkpoint, read_trainer_state, save_checkpoint, save_json
from spo_cli.credit import estimated_credit
from spo_cli.distributed import Cluster
from spo_cli.episode import Episode, write_episodes
from spo_cli.errors import SpoError
from spo_cli.estimate.method import Method, MethodSetup, Rollouts, build_method
from spo_cli.evaluate import accuracy, evaluate_policy
from spo_cli.faults import crash_point
from spo_cli.fsutil import atomic_write_text
from spo_cli.hardware import resolve_runtime
from spo_cli.lora import (
    ADAPTER_DIR, AdapterDisabledReference, apply_lora, load_adapter, set_adapter_base, trainable_parameters,
)
from spo_cli.metrics import MetricsLog, check_report_to_installed, iteration_seconds, metric_sinks, truncate_records
from spo_cli.models import load_checkpoint
from spo_cli.optimize.learner import build_learner, start_processes
from spo_cli.optimize.schedule import build_scheduler
from spo_cli.optimize.episode_count import fit_episode_count
from spo_cli.optimize.step import ppo_update, steps_per_iteration
from spo_cli.partition import partition_episodes
from spo_cli.policy_loading import WARM_START_DIR, Policy, set_offline_defaults, warm_started_policy
from spo_cli.recipe import Eval, Recipe, Sft, dump_recipe
from spo_cli.rundir import RESOLVED_RECIPE, check_resume_world, run_directory
from spo_cli.sample import build_sampler, check_backend_installed, sampling_params
from spo_cli.seeding import derive_seed
from spo_cli.tasks import Task, build_task


@dataclass
class TrainingRun:
    """Everything the loop uses, built once by `build_run`."""

    recipe: Recipe
    console: Console
    cluster: Cluster
    runtime: Any
    task: Task
    run_dir: Path
    start: int  # the first iteration of this start: 1, or the one after the checkpoint resumed from
    learner: Any
    model: Any  # the inference module: sampling and scoring run it (the trained one, or ZeRO-3's full copy)
    tokenizer: Any
    ref_model: Any  # the KL term's frozen reference policy (loss.beta > 0), else None
    sampler: Any
    method: Method
    metrics_log: MetricsLog | None  # on the main process
    eval_problems: list
    evaluate: Callable[[str, int], dict[str, float]]  # (tag, iteration) -> metrics, saved as eval_<tag>.json


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    overwrite_foreign: bool = False,
) -> dict[str, Any] | None:
    """Run (or resume) a whole training job; returns the final summary (also saved as summary.json), or None on
    the processes of a distributed run other than the main one. `overwrite` deletes what spo wrote in the run
    directory first (refusing when it holds other files), `overwrite_foreign` the other files too."""
    console = console or Console()
    check_backend_installed(recipe.sampling)
    check_report_to_installed(recipe)
    set_offline_defaults(recipe)
    runtime = resolve_runtime(recipe.hardware)
    # Data problems (a missing file, an unreachable hub) surface before a run directory exists.
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    # Grader worker processes, log writers and the process group are released however the run ends.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(task.close)
        run = build_run(recipe, task, runtime, resume, overwrite, console, cleanup, overwrite_foreign)
        before = _read_json(run.run_dir / "eval_before.json")
        if recipe.eval.before_training and run.eval_problems and before is None:
            before = run.evaluate("before", 0)
        last, wall0 = run_loop(run)
        after = None
        if recipe.eval.after_training and run.eval_problems:
            after = _read_json(run.run_dir / "eval_after.json") if run.start > last else None
            after = after or run.evaluate("after", last)
        summary = {
            "run_dir": str(run.run_dir),
            "iterations": last,
            # All of the run's iterations, also those before a resume (what train.time_budget_s counts).
            "rl_seconds": iteration_seconds(run.run_dir, last) if run.cluster.is_main else None,
            "rl_seconds_this_start": time.perf_counter() - wall0,
            "eval_before": _strip(before),
            "eval_after": _strip(after),
            "final_checkpoint": str(latest_checkpoint(run.run_dir)),
        }
        if run.cluster.is_main:
            save_json(run.run_dir / "summary.json", summary)  # while the run still holds its directory's lock
        # No process leaves the group while another may still be in a collective (a process that tears its gloo
        # group down early can abort at exit). Only on success: after an error the launcher stops the others.
        run.cluster.barrier()
    is_main, distributed = run.cluster.is_main, run.cluster.distributed
    # destroy_process_group only unregistered the group: the DDP module's reducer keeps it, and the module sits in
    # reference cycles. Freed during the interpreter's finalization, a gloo thread still holding work aborts the
    # process after a run that succeeded (SIGABRT, "terminate called without an active exception": the rare rank-1
    # abort of the two-process tests, docs/software_stack.md#deepspeed-and-the-process-group-at-exit). Free it now.
    del run
    if distributed:
        gc.collect()
    if not is_main:
        return None
    _print_before_after(console, before, after)
    return summary


def build_run(
    recipe: Recipe, task: Task, runtime, resume: bool, overwrite: bool, console: Console, cleanup: contextlib.ExitStack,
    overwrite_foreign: bool = False,
) -> TrainingRun:  # fmt: skip
    """Start the processes, take the run directory, load the policy (warm start, or the checkpoint resumed from),
    build the recipe's method, the learner and the sampler, and open the metrics log."""
    accelerator, cluster, deepspeed_config = start_processes(recipe.hardware, runtime)
    if accelerator is not None:
        cleanup.callback(_end_processes)
    if not cluster.is_main:
        # One process speaks and writes; the others compute the same iteration silently.
        console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (closed with the process)
    # Checked, locked for the whole run, and removed again if the start fails before any result.
    run_dir = cleanup.enter_context(run_directory(recipe, resume, overwrite, cluster, overwrite_foreign=overwrite_foreign))
    checkpoint = latest_checkpoint(run_dir) if resume else None
    _save_resolved_recipe(recipe, run_dir, resume, cluster, console)
    if cluster.distributed:
        console.print(f"{cluster.world_size} processes ({_engine_name(accelerator)}), backend {_backend()}")
    policy, ref_model, start = _starting_policy(recipe, run_dir, task, runtime, console, cluster, checkpoint, accelerator)
    warm_start_dir = run_dir / WARM_START_DIR if isinstance(recipe.warm_start, Sft) else None
    setup = MethodSetup(
        recipe, task, policy.model, policy.tokenizer, runtime, cluster, run_dir, console, checkpoint, warm_start_dir
    )
    # Before the learner: a method that copies the policy (the critic) needs its weights unpartitioned.
    method = build_method(recipe.estimator, setup)
    if recipe.lora is not None:  # after the method: a critic copies the policy without adapters
        policy, ref_model = _with_lora(recipe, policy, checkpoint, warm_start_dir, console)
    learner = _build_learner(recipe, policy.model, accelerator, cluster, deepspeed_config, checkpoint)
    model = learner.inference_model
    sampler = build_sampler(
        recipe.sampling, model, policy.tokenizer, runtime, cluster=cluster, seed=recipe.run.seed, log=console.print
    )
    max_context = _max_context(model)
    method.start(Rollouts(sampler, sampling_params(recipe.sampling, task.stop, max_context), model, max_context))
    # Resuming drops the records of iterations after the checkpoint: they are about to be redone.
    metrics_log = None
    if cluster.is_main:
        resume_iteration = start - 1 if resume else None
        metrics_log = MetricsLog(run_dir, metric_sinks(run_dir, recipe, resume_iteration), resume_iteration)
        cleanup.callback(metrics_log.close)
        if resume:
            truncate_records(run_dir / "completions.jsonl", start - 1)
    eval_problems = task.eval_problems()
    evaluate = _evaluator(recipe, sampler, policy.tokenizer, task, eval_problems, run_dir, cluster, console)
    return TrainingRun(
        recipe, console, cluster, runtime, task, run_dir, start, learner, model, policy.tokenizer, ref_model, sampler,
        method, metrics_log, eval_problems, evaluate,
    )  # fmt: skip


def run_loop(run: TrainingRun) -> tuple[int, float]:
    """Iterate from `run.start` until `train.iterations` or the time budget; returns the last iteration and the
    loop's start time (perf_counter)."""
    recipe, cluster, console = run.recipe, run.cluster, run.console
    budget = recipe.train.time_budget_s
    # The budget counts the iterations' own time; a resumed run's earlier iterations count too. Every process
    # follows the main process's clock, so all stop after the same iteration.
    used = iteration_seconds(run.run_dir, run.start - 1) if cluster.is_main and run.start > 1 else 0.0
    used = cluster.sum_floats({"used": used})["used"]
    last = run.start - 1 if budget is not None and used >= budget else recipe.train.iterations
    progress = _progress(console, recipe.logging.progress and cluster.is_main)
    wall0 = time.perf_counter()
    with progress:
        bar = progress.add_task("RL", total=recipe.train.iterations, completed=run.start - 1)
        for iteration in range(run.start, last + 1):
            record, trained, sampled = run_iteration(run, iteration)
            # Wall time of this process's loop so far, logging and checkpoints included (a peer's per-step time
            # measures the same).
            record["time/loop_elapsed_s"] = time.perf_counter() - wall0
            used_before = used
            used += cluster.sum_floats({"t": record["time/iteration_s"] if cluster.is_main else 0.0})["t"]
            if budget is not None and used >= budget and iteration < last:
                console.print(f"time budget of {budget:g} s reached after iteration {iteration} ({used:.1f} s)")
                last = iteration
            if cluster.is_main:
                _save_iteration_logs(run, iteration, trained, sampled)
            if _eval_due(recipe.eval, iteration, used_before, used) and iteration < last:
                record.update(run.evaluate(f"iter_{iteration:06d}", iteration))
            if run.metrics_log is not None:
                run.metrics_log.log(record)
            console.print(f"it {iteration}/{recipe.train.iterations}  " + _fmt(record))
            progress.update(bar, completed=iteration)
            if iteration % recipe.train.save_steps == 0 or iteration == last:
                save_checkpoint(
                    run.run_dir, iteration, run.learner, run.tokenizer,
                    {"data_position": iteration * recipe.sampling.prompts_per_iteration, "seed": recipe.run.seed},
                    keep=recipe.train.save_total_limit,
                    # State beyond the policy's that each checkpoint must hold for an exact resume.
                    extra_writers=[run.method.save_state],
                )  # fmt: skip
            if iteration == last:  # the time budget may end the run early
                break
    return last, wall0


def run_iteration(run: TrainingRun, iteration: int) -> tuple[dict[str, Any], list[Episode], list[Episode]]:
    """One iteration: the method samples, the partitioner cuts, the method estimates and assembles the training
    episodes, the policy (and the method's critic) update, the method sees the outcome. Returns the iteration's
    metrics record, the trained episodes and the sampled ones."""
    recipe, method = run.recipe, run.method
    t0 = time.perf_counter()
    sample = method.sample(iteration)
    t_sample = time.perf_counter() - t0
    crash_point("sample", iteration)
    sampled = sample.episodes
    estimated, estimate_stats = method.estimate(partition_episodes(sampled, recipe.partitioner, run.tokenizer), iteration)
    # Against the task's ground truth, on this iteration's own responses (before a replay buffer adds older ones).
    estimate_stats.update(estimated_credit(sampled, estimated))
    episodes, assembly_stats = method.training_episodes(estimated, iteration)
    estimate_stats.update(assembly_stats)
    if recipe.train.episodes_per_iteration is not None:
        estimate_stats["episodes/unique"] = float(len(episodes))
        rng = random.Random(derive_seed(recipe.run.seed, "fit", iteration))
        episodes = fit_episode_count(episodes, recipe.train.episodes_per_iteration, rng)
    t1 = time.perf_counter()
    t_estimate = t1 - t0 - t_sample
    update = _optimize(run, episodes, iteration)
    t_opt = time.perf_counter() - t1
    update.update(method.after_update(episodes, iteration))
    record: dict[str, Any] = {
        "iteration": iteration,
        **rollout_metrics(sampled),
        **update,
        **sample.stats,
        **estimate_stats,
        **_segment_metrics(episodes),
        "tokens_per_second": sample.generated_tokens / max(t_sample, 1e-9),
        # Every token the policy generated this iteration: responses (or tree nodes) and Monte Carlo rollouts,
        # what a comparison at equal sampled tokens counts.
        "tokens/generated": sample.generated_tokens + estimate_stats.get("mc/generated_tokens", 0.0),
        "time/sample_s": t_sample,
        "time/estimate_s": t_estimate,
        "time/optimize_s": t_opt,
        "time/iteration_s": time.perf_counter() - t0,
    }
    return record, episodes, sampled


def _optimize(run: TrainingRun, episodes: list[Episode], iteration: int) -> dict[str, float]:
    """The PPO update on `episodes` (with the method's critic beside the policy), then the sampler's new weights."""
    recipe = run.recipe
    run.sampler.sleep()
    update = ppo_update(
        run.learner, episodes,
        loss=recipe.loss, train=recipe.train,
        temperature=recipe.sampling.temperature, runtime=run.runtime, pad_id=run.tokenizer.pad_token_id,
        rng=random.Random(derive_seed(recipe.run.seed, "shuffle", iteration)), ref_model=run.ref_model,
        critic=run.method.critic, on_optimizer_step=lambda _: crash_point("optimize", iteration),
    )  # fmt: skip
    run.learner.refresh_inference_model()
    _check_finite_weights(run.model, iteration, run.run_dir)
    run.sampler.sync_weights()
    return update


def _starting_policy(
    recipe: Recipe, run_dir: Path, task: Task, runtime, console: Console, cluster: Cluster, checkpoint: Path | None,
    accelerator,
) -> tuple[Policy, Any, int]:  # fmt: skip
    """The policy this start trains (the warm start, or the checkpoint's), the KL reference (the warm start, also
    when resuming; None without a KL term) and the first iteration."""
    policy = warm_started_policy(recipe, run_dir, task, runtime, console, cluster)
    ref_model = None
    if recipe.loss.beta > 0 and recipe.lora is None:  # a LoRA run's reference is its own base (`_with_lora`)
        ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    start = 1
    if checkpoint is not None:
        state = read_trainer_state(checkpoint)
        check_resume_world(state, checkpoint, cluster, accelerator)
        if recipe.lora is None:  # a LoRA run keeps the warm start and loads its adapter onto it (`_with_lora`)
            model, tokenizer = load_checkpoint(checkpoint / "model")
            policy = Policy(model.to(runtime.device), tokenizer)
        start = state["iteration"] + 1
        console.print(f"resuming from {checkpoint} (iteration {state['iteration']})")
    if recipe.hardware.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    policy.model.config.use_cache = True
    return policy, ref_model, start


def _with_lora(
    recipe: Recipe, policy: Policy, checkpoint: Path | None, warm_start_dir: Path | None, console: Console
) -> tuple[Policy, Any]:
    """The policy with LoRA adapters (fresh, or the checkpoint's when resuming) and its KL reference: the same module
    with the adapters disabled (None without a KL term)."""
    spec = recipe.lora
    if checkpoint is None:
        model = apply_lora(policy.model, spec, recipe.run.seed)
    else:
        model = load_adapter(policy.model, spec, checkpoint / ADAPTER_DIR)
    set_adapter_base(model, str(warm_start_dir.resolve()) if warm_start_dir else recipe.model.name_or_path)
    if recipe.hardware.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    trained = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    console.print(f"LoRA: training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    reference = AdapterDisabledReference(model) if recipe.loss.beta > 0 else None
    return Policy(model, policy.tokenizer), reference


def _build_learner(recipe: Recipe, model, accelerator, cluster: Cluster, deepspeed_config, checkpoint: Path | None):
    """AdamW and the learning-rate schedule over `model`, in the learner of this run's engine; restored from the
    checkpoint when resuming."""

    optim = recipe.optim
    optimizer = torch.optim.AdamW(
        trainable_parameters(model),  # all of them, or a LoRA run's adapters
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
    )
    per_iter = steps_per_iteration(
        recipe.train.episodes_per_iteration or recipe.sampling.prompts_per_iteration * recipe.sampling.num_generations,
        recipe.train,
        cluster.world_size,
    )
    total_steps = per_iter * (optim.schedule_iterations or recipe.train.iterations)
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_ratio * total_steps)
    learner = build_learner(
        accelerator, cluster, model, optimizer,
        lambda opt: build_scheduler(opt, total_steps=total_steps, warmup_steps=warmup, kind=optim.lr_scheduler_type),
        deepspeed_config=deepspeed_config, max_grad_norm=optim.max_grad_norm,
        micro_batch=recipe.train.per_device_train_batch_size,
        accumulation=recipe.train.gradient_accumulation_steps,
    )  # fmt: skip
    if checkpoint is not None:
        learner.load_state(checkpoint)
    return learner


def _evaluator(recipe: Recipe, sampler, tokenizer, task: Task, problems: list, run_dir: Path, cluster: Cluster, console):
    """The held-out evaluation of the current policy: `evaluate(tag, iteration)` -> metrics, saved as
    <run_dir>/eval_<tag>.json by the main process."""
    max_tokens = recipe.eval.max_completion_length or recipe.sampling.max_completion_length

    def evaluate(tag: str, iteration: int) -> dict[str, float]:
        result = evaluate_policy(
            sampler, tokenizer, task, problems, recipe.eval, max_tokens,
            seed=derive_seed(recipe.run.seed, "eval"), keep_eos_token=recipe.sampling.keep_eos_token,
            tools=recipe.sampling.tools is not None,
        )  # fmt: skip
        if cluster.is_main:
            save_json(run_dir / f"eval_{tag}.json", {"iteration": iteration, **result})
        console.print(f"eval ({tag}, iteration {iteration}): " + _fmt(result, "eval/"))
        return result

    return evaluate


def _save_resolved_recipe(recipe: Recipe, run_dir: Path, resume: bool, cluster: Cluster, console: Console) -> None:
    saved = run_dir / RESOLVED_RECIPE
    if resume and saved.is_file() and saved.read_text() != dump_recipe(recipe):
        console.print("[yellow]warning:[/] the recipe differs from the one this run started with")
    if cluster.is_main:
        atomic_write_text(saved, dump_recipe(recipe))


def _save_iteration_logs(run: TrainingRun, iteration: int, trained: list[Episode], sampled: list[Episode]) -> None:
    """The trained episodes (logging.save_episodes) and a few graded completions (logging.log_completions)."""
    spec = run.recipe.logging
    if spec.save_episodes:
        write_episodes(run.run_dir / "episodes" / f"iter_{iteration:06d}.jsonl", trained)
    graded = [ep for ep in sampled if ep.reward is not None]
    show = iteration == run.start or iteration % run.recipe.train.save_steps == 0
    _log_completions(run.run_dir, graded, spec.log_completions, iteration, run.console, show)


def _print_before_after(console: Console, before: dict | None, after: dict | None) -> None:
    if not (before and after):
        return
    for key in ("greedy_accuracy", "sampled_accuracy"):
        if f"eval/{key}" in before:
            console.print(
                f"[bold]held-out {key.replace('_', ' ')}: before RL {_with_se(before, key)} -> "
                f"after RL {_with_se(after, key)}[/]"
            )


def rollout_metrics(episodes: list[Episode]) -> dict[str, float]:
    # Tree node episodes: only leaves carry a reward.
    episodes = [ep for ep in episodes if ep.reward is not None]
    if not episodes:
        return {}
    rewards = [ep.reward for ep in episodes]
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    by_group: dict[str, list[float]] = {}
    for ep in episodes:
        by_group.setdefault(ep.group_id, []).append(ep.reward)
    lengths = [len(ep.response_token_ids) for ep in episodes]
    return {
        "reward": mean,
        "reward_std": std,
        "accuracy": accuracy(rewards),
        "frac_reward_zero_std": sum(1 for g in by_group.values() if max(g) == min(g)) / len(by_group),
        "completions/mean_length": sum(lengths) / n,
        "completions/max_length": float(max(lengths)),
        "completions/clipped_ratio": sum(1 for ep in episodes if ep.finish_reason == "length") / n,
    }



def _end_processes() -> None:
    """Leave the process group (without it, ZeRO-3 processes abort at exit:
    docs/software_stack.md#deepspeed-and-the-process-group-at-exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _engine_name(accelerator) -> str:
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return "DDP"
    return f"DeepSpeed ZeRO-{plugin.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}"


def _backend() -> str:
    return dist.get_backend()


def _check_finite_weights(model, iteration: int, run_dir: Path) -> None:
    """Stop before a checkpoint of non-finite weights is written (a learning rate far too high for the model): every
    later iteration would sample from NaN probabilities. Skipped fp16 overflow steps leave the weights finite."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    raise SpoError(
        f"iteration {iteration}: the update made the policy's weights non-finite (NaN or inf), so the run stops "
        f"without checkpointing them; lower optim.learning_rate or optim.max_grad_norm. The last good checkpoint "
        f"is {latest_checkpoint(run_dir) or 'none (start again)'}"
    )


def _eval_due(spec: Eval, iteration: int, used_before: float, used: float) -> bool:
    """Whether the held-out evaluation runs after `iteration`, whose own time took the loop's iteration time from
    `used_before` to `used` seconds (every process sees the main process's clock, so all agree)."""
    if spec.eval_steps and iteration % spec.eval_steps == 0:
        return True
    every = spec.eval_every_s
    return every is not None and math.floor(used / every) > math.floor(used_before / every)


def _max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _segment_metrics(episodes: list[Episode]) -> dict[str, float]:
    counts = [len(ep.segments or []) for ep in episodes]
    return {"segments/mean_count": sum(counts) / max(len(counts), 1)}


def _with_se(result: dict, key: str) -> str:
    """0.812, or 0.812 ± 0.004 where the evaluation measured its sampling standard error."""
    se = result.get(f"eval/{key}_se")
    return f"{result[f'eval/{key}']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _strip(result: dict | None) -> dict | None:
    return None if result is None else {k.removeprefix("eval/"): v for k, v in result.items() if k != "iteration"}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


_SHOWN = (
    "reward",
    "accuracy",
    "single_stream/value",
    "single_stream/rho",
    "kl",
    "clip_ratio",
    "entropy",
    "grad_norm",
    "completions/mean_length",
    "tokens_per_second",
    "time/iteration_s",
)


def _fmt(record: dict[str, Any], prefix: str | None = None) -> str:
    keys = [k for k in record if k.startswith(prefix)] if prefix else [k for k in _SHOWN if k in record]
    parts = []
    for k in keys:
        v = record[k]
        name = k.removeprefix(prefix or "").split("/")[-1]
        parts.append(f"{name} {v:.0f}" if abs(v) >= 100 else f"{name} {v:.3f}")
    return "  ".join(parts)


def _log_completions(
    run_dir: Path, episodes: list[Episode], n: int, iteration: int, console: Console, show: bool
) -> None:
    if n <= 0:
        return
    shown = episodes[:n]
    if not shown:
        return
    with (run_dir / "completions.jsonl").open("a", encoding="utf-8") as fh:
        for ep in shown:
            row = {"iteration": iteration, "prompt": ep.prompt, "completion": ep.response, "reward": ep.reward}
            fh.write(json.dumps(row) + "\n")
    if show:
        ep = shown[0]
        body = Text(ep.prompt) + Text(ep.response, style="bold")
        console.print(Panel(body, title=f"iteration {iteration}, reward {ep.reward:g}", expand=False))


def _progress(console: Console, enabled: bool):
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )
