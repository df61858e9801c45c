"""The training loop: sample -> partition -> estimate -> optimize, with evaluation and checkpoints.

This is the only module that knows the order of the stages. Every random stream is derived from
(run.seed, stage, iteration), so a resumed run samples and shuffles exactly what an uninterrupted
run would have.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from spo_cli.checkpoint import latest_checkpoint, read_trainer_state, save_checkpoint, save_json
from spo_cli.credit import PATH_FIRST_ERROR, estimated_credit, token_at_char, tree_paths
from spo_cli.distributed import LOCAL, Cluster
from spo_cli.episode import Episode, write_episodes
from spo_cli.errors import SpoError, SpoUserError
from spo_cli.estimate import estimate_advantages
from spo_cli.estimate.single_stream import BASELINE_KEY
from spo_cli.faults import crash_point
from spo_cli.fsutil import atomic_write_text, publish_dir
from spo_cli.metrics import MetricsLog, truncate_records
from spo_cli.partition import partition_episodes
from spo_cli.recipe import (
    WARM_START_RECORD, Eval, Gae, McTree, PretrainedModel, Recipe, SegmentGae, Sft, SingleStream, TinyModel,
    dump_recipe, warm_start_differences, warm_start_record,
)  # fmt: skip
from spo_cli.replay import EdgeReplayBuffer, fit_episode_count
from spo_cli.rundir import RESOLVED_RECIPE, run_directory, world_mismatch
from spo_cli.tasks import Task, apply_template, build_task, derive_seed, epoch_slice

WARM_START_DIR = "warm_start"


@dataclass
class Policy:
    model: Any
    tokenizer: Any


def set_offline_defaults(recipe: Recipe) -> None:
    """Never touch the network unless the recipe names a hub model or dataset."""
    uses_hub = (isinstance(recipe.model, PretrainedModel) and not Path(recipe.model.name_or_path).exists()) or (
        getattr(recipe.task, "dataset_name", None) is not None and getattr(recipe.task, "train_file", None) is None
    )
    if not uses_hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def initial_policy(recipe: Recipe) -> Policy:
    """The policy before any training: a freshly built tiny model or a pretrained checkpoint."""
    from spo_cli.models import build_byte_tokenizer, build_tiny_model, load_pretrained

    spec = recipe.model
    if isinstance(spec, TinyModel):
        tokenizer = build_byte_tokenizer()
        return Policy(build_tiny_model(spec, tokenizer, recipe.run.seed), tokenizer)
    model, tokenizer = load_pretrained(spec)
    return Policy(model, tokenizer)


def warm_started_policy(
    recipe: Recipe, run_dir: Path, task: Task, runtime, console: Console, cluster: Cluster = LOCAL
) -> Policy:
    """The policy RL starts from. The warm start is made once (on the main process: trained, or copied from
    `warm_start.load_from`) and saved in the run directory, where the other processes load it from."""
    from spo_cli.models import load_checkpoint

    saved = run_dir / WARM_START_DIR
    done = (saved / "config.json").is_file()
    cluster.barrier()  # every process has looked before the main one may write it
    if not isinstance(recipe.warm_start, Sft):
        policy = initial_policy(recipe)
        policy.model.to(runtime.device)
        return policy
    if not done and cluster.is_main:
        trained = None
        if recipe.warm_start.load_from is None:
            trained = _supervised_warm_start(recipe, run_dir, task, runtime, console)
        else:
            _copy_warm_start(recipe, Path(recipe.warm_start.load_from).expanduser(), run_dir, console)
        cluster.barrier()
        if trained is not None:
            return trained
    elif not done:
        cluster.barrier()  # the main process makes it
    console.print(f"warm start: loading {saved}")
    model, tokenizer = load_checkpoint(saved)
    return Policy(model.to(runtime.device), tokenizer)


def _supervised_warm_start(recipe: Recipe, run_dir: Path, task: Task, runtime, console: Console) -> Policy:
    """Train the recipe's warm start and publish it, with the record of its settings, as <run_dir>/warm_start."""
    from spo_cli.models import save_model
    from spo_cli.sft import run_sft

    policy = initial_policy(recipe)
    policy.model.to(runtime.device)
    spec = recipe.warm_start
    console.print(f"warm start: supervised fine-tuning for {spec.steps} steps")
    stats = run_sft(policy.model, policy.tokenizer, task, spec, runtime, recipe.run.seed, console.print)
    staging = run_dir / f".{WARM_START_DIR}.partial"
    save_model(policy.model, policy.tokenizer, staging)
    (staging / "sft_stats.json").write_text(json.dumps(stats, indent=2))
    record = warm_start_record(recipe.model, spec, recipe.task, recipe.run.seed)
    (staging / WARM_START_RECORD).write_text(json.dumps(record, indent=2))
    publish_dir(staging, run_dir / WARM_START_DIR)
    return policy


def _copy_warm_start(recipe: Recipe, source: Path, run_dir: Path, console: Console) -> None:
    """Publish a copy of a saved warm start (hard links where the filesystem allows) as <run_dir>/warm_start, so
    the run directory stays complete on its own. The recipe check has matched its model and warm_start settings."""
    import shutil

    recorded = json.loads((source / WARM_START_RECORD).read_text())
    wanted = warm_start_record(recipe.model, recipe.warm_start, recipe.task, recipe.run.seed)
    console.print(f"warm start: copying {source} (made by an earlier run with these model and warm_start settings)")
    for difference in warm_start_differences(recorded, wanted):
        console.print(f"  made with another {difference}")
    staging = run_dir / f".{WARM_START_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, copy_function=_link_or_copy)
    publish_dir(staging, run_dir / WARM_START_DIR)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        import shutil

        shutil.copy2(src, dst)


def training_prompts(sampler, tokenizer, task: Task, recipe: Recipe, iteration: int) -> tuple[list, list[str]]:
    """The iteration's problems and their formatted prompts (over-long prompts dropped)."""
    problems = task.train_problems(iteration, recipe.sampling.prompts_per_iteration, recipe.run.seed)
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    if recipe.sampling.max_prompt_length is not None:
        lengths = [len(ids) for ids in sampler.encode_prompts(prompts)]
        kept = [i for i, n in enumerate(lengths) if n <= recipe.sampling.max_prompt_length]
        problems, prompts = [problems[i] for i in kept], [prompts[i] for i in kept]
        if not problems:
            raise SpoUserError(f"`sampling.max_prompt_length` ({recipe.sampling.max_prompt_length}) drops every prompt")
    return problems, prompts


def sample_episodes(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params
) -> tuple[list[Episode], dict[str, float]]:
    problems, prompts = training_prompts(sampler, tokenizer, task, recipe, iteration)
    episodes = graded_episodes(sampler, tokenizer, task, recipe, iteration, params, problems, prompts)
    return episodes, {"num_prompts": float(len(problems))}


def graded_episodes(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params, problems: list, prompts: list[str],
    metadata=None,
) -> list[Episode]:
    """Sample `params.n` responses per prompt and grade them; `metadata[i]` goes on every episode of prompt i."""
    groups = sampler.generate(prompts, params, seed=derive_seed(recipe.run.seed, "sample", iteration))
    flat = [(i, p, prompt, c) for i, (p, prompt, g) in enumerate(zip(problems, prompts, groups)) for c in g]
    rewards = task.rewards([c.text for *_, c in flat], [p.gold for _, p, _, _ in flat], [c.finish_reason for *_, c in flat])
    return [
        Episode(
            id=f"it{iteration}-{k}",
            group_id=f"it{iteration}-{p.id}",
            iteration=iteration,
            prompt=prompt,
            response=c.text,
            gold=p.gold,
            prompt_token_ids=c.prompt_token_ids,
            response_token_ids=c.token_ids,
            response_logprobs=c.logprobs,
            response_entropies=c.entropies,
            finish_reason=c.finish_reason,
            reward=r,
            first_error=first_error_token(task, tokenizer, p, c.text, c.token_ids) if r < 1.0 else None,
            metadata=dict(metadata[i]) if metadata is not None else {},
        )
        for k, ((i, p, prompt, c), r) in enumerate(zip(flat, rewards))
    ]


def first_error_token(task: Task, tokenizer, problem, text: str, token_ids: list[int]) -> int | None:
    """The response token where a wrong response first departs from a correct solution, on a task that can tell."""
    if task.first_error is None:
        return None
    offset = task.first_error(text, problem)
    if offset is None:
        return None
    return token_at_char(offset, token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def sample_single_stream(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params, tracker, pool: list
) -> tuple[list[Episode], dict[str, float]]:
    """Single-stream SPO's sampling: prioritised prompts from the pool, each episode carrying its prompt's
    tracker value from before this step's observation (the baseline)."""
    spec = recipe.estimator.prompt_sampling
    seed = recipe.run.seed
    if spec.pool_size is not None and spec.pool_size < len(pool):
        pool = [pool[i] for i in epoch_slice(len(pool), (iteration - 1) * spec.pool_size, spec.pool_size, seed)]
    keys = [task.format_prompt(p.question) for p in pool]
    count = recipe.sampling.prompts_per_iteration
    rng = random.Random(derive_seed(seed, "prompt-sampling", iteration))
    try:
        chosen = tracker.select(keys, count, rng)
    except ValueError as exc:
        raise SpoUserError(f"single_stream prompt sampling: {exc} (sampling.prompts_per_iteration is {count})") from None
    problems = [pool[i] for i in chosen]
    prompts = [apply_template(tokenizer, keys[i], task.use_chat_template) for i in chosen]
    metadata = [{BASELINE_KEY: {"key": keys[i], "value": tracker.value(keys[i])}} for i in chosen]
    episodes = graded_episodes(sampler, tokenizer, task, recipe, iteration, params, problems, prompts, metadata)
    return episodes, {"num_prompts": float(len(problems))}


def sample_trees(
    sampler, tokenizer, task: Task, recipe: Recipe, iteration: int, params
) -> tuple[list[Episode], dict[str, float]]:
    """SPO-tree's sampling: one tree per prompt; returns its node episodes."""
    from spo_cli.estimate.mc_tree import grow_trees

    problems, prompts = training_prompts(sampler, tokenizer, task, recipe, iteration)
    questions = [(p.id, prompt, p.gold) for p, prompt in zip(problems, prompts)]
    episodes, stats = grow_trees(
        questions, sampler, tokenizer, task, recipe.estimator, params, seed=recipe.run.seed, iteration=iteration
    )
    episodes = mark_path_first_errors(episodes, {p.id: p for p in problems}, task, tokenizer)
    return episodes, {"num_prompts": float(len(problems)), **stats}


def mark_path_first_errors(nodes: list[Episode], problems: dict, task: Task, tokenizer) -> list[Episode]:
    """SPO-tree's wrong leaves, each with the first wrong token of its whole root-to-leaf path
    (`credit.PATH_FIRST_ERROR` in `metadata["tree"]`), on a task that can tell."""
    if task.first_error is None:
        return nodes
    paths = tree_paths(nodes)
    marked = []
    for ep in nodes:
        if ep.id in paths and ep.reward is not None and ep.reward < 1.0:
            ids = [t for node in paths[ep.id] for t in node.response_token_ids]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            first = first_error_token(task, tokenizer, problems[ep.metadata["tree"]["question"]], text, ids)
            ep = ep.model_copy(update={"metadata": {**ep.metadata, "tree": {**ep.metadata["tree"], PATH_FIRST_ERROR: first}}})
        marked.append(ep)
    return marked


def rollout_metrics(episodes: list[Episode]) -> dict[str, float]:
    from spo_cli.evaluate import accuracy

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


def train(
    recipe: Recipe, *, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> dict[str, Any] | None:
    """Run (or resume) a whole training job; returns the final summary (also saved as summary.json), or None on
    the processes of a distributed run other than the main one."""
    import torch

    from spo_cli.evaluate import evaluate_policy
    from spo_cli.hardware import resolve_runtime
    from spo_cli.models import load_checkpoint
    from spo_cli.optimize.learner import build_learner, start_processes
    from spo_cli.optimize.schedule import build_scheduler
    from spo_cli.optimize.step import ppo_update, steps_per_iteration
    from spo_cli.estimate.rollout import build_state_values
    from spo_cli.sample import build_sampler, check_backend_installed, sampling_params

    console = console or Console()
    check_backend_installed(recipe.sampling)
    set_offline_defaults(recipe)
    runtime = resolve_runtime(recipe.hardware)
    # Data problems (a missing file, an unreachable hub) surface before a run directory exists.
    task = build_task(recipe.task, recipe.sampling.prompts_per_iteration)
    # Grader worker processes, log writers and the process group are released however the run ends.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(task.close)
        accelerator, cluster, deepspeed_config = start_processes(recipe.hardware, runtime)
        if accelerator is not None:
            cleanup.callback(_end_processes)
        if not cluster.is_main:
            # One process speaks and writes; the others compute the same iteration silently.
            console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (closed with the process)
        # Checked, locked for the whole run, and removed again if the start fails before any result.
        run_dir = cleanup.enter_context(run_directory(recipe, resume, overwrite, cluster))
        seed = recipe.run.seed
        ckpt = latest_checkpoint(run_dir) if resume else None
        saved_recipe = run_dir / RESOLVED_RECIPE
        if resume and saved_recipe.is_file() and saved_recipe.read_text() != dump_recipe(recipe):
            console.print("[yellow]warning:[/] the recipe differs from the one this run started with")
        if cluster.is_main:
            atomic_write_text(saved_recipe, dump_recipe(recipe))
        if cluster.distributed:
            console.print(f"{cluster.world_size} processes ({_engine_name(accelerator)}), backend {_backend()}")

        policy = warm_started_policy(recipe, run_dir, task, runtime, console, cluster)
        ref_model = None
        if recipe.loss.beta > 0:
            ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            _check_resume_world(state, ckpt, cluster, accelerator)
            model, tokenizer = load_checkpoint(ckpt / "model")
            policy = Policy(model.to(runtime.device), tokenizer)
            start = state["iteration"] + 1
            console.print(f"resuming from {ckpt} (iteration {state['iteration']})")
        else:
            start = 1
        model, tokenizer = policy.model, policy.tokenizer
        if recipe.hardware.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = True

        optim = recipe.optim
        optimizer = torch.optim.AdamW(
            model.parameters(),
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
        critic = _critic(recipe, model, tokenizer, ckpt, runtime)
        learner = build_learner(
            accelerator, cluster, model, optimizer,
            lambda opt: build_scheduler(opt, total_steps=total_steps, warmup_steps=warmup, kind=optim.lr_scheduler_type),
            deepspeed_config=deepspeed_config, max_grad_norm=optim.max_grad_norm,
            micro_batch=recipe.train.per_device_train_batch_size,
            accumulation=recipe.train.gradient_accumulation_steps,
        )  # fmt: skip
        if ckpt is not None:
            learner.load_state(ckpt)
        # Sampling and scoring run the inference module: the trained one, or ZeRO-3's full copy of it.
        model = learner.inference_model
        critic_values = _critic_values(critic, recipe, tokenizer, runtime, cluster)
        if isinstance(recipe.estimator, SegmentGae) and critic is None:
            console.print(
                "segment_gae: no value network (estimator.critic is null): advantages are r - group mean, "
                "lambda = 1; segments are only logged"
            )

        sampler = build_sampler(recipe.sampling, model, tokenizer, runtime, cluster=cluster, seed=seed)
        params = sampling_params(recipe.sampling, task.stop, _max_context(model))
        state_values = build_state_values(recipe, sampler, tokenizer, task, _max_context(model))
        tree = recipe.estimator if isinstance(recipe.estimator, McTree) else None
        replay = EdgeReplayBuffer(tree.replay.max_age, tree.replay.edges_per_question) if tree and tree.replay else None
        if replay is not None and ckpt is not None:
            replay.load(ckpt)
        single_stream = recipe.estimator if isinstance(recipe.estimator, SingleStream) else None
        tracker, pool = None, []
        if single_stream:
            pool = training_pool(sampler, tokenizer, task, recipe)
            tracker = _tracker(
                recipe, task, sampler, tokenizer, pool, run_dir, ckpt, console, _max_context(model), cluster
            )
        # State beyond the policy's that each checkpoint must hold for an exact resume.
        extra_writers = [
            w
            for w in (
                _critic_writer(critic),
                replay.save if replay is not None else None,
                tracker.save if tracker is not None else None,
            )
            if w
        ]
        # Resuming drops the records of iterations after the checkpoint: they are about to be redone.
        metrics_log = None
        if cluster.is_main:
            metrics_log = MetricsLog(run_dir, recipe.logging.tensorboard, resume_iteration=start - 1 if resume else None)
            cleanup.callback(metrics_log.close)
            if resume:
                truncate_records(run_dir / "completions.jsonl", start - 1)
        eval_problems = task.eval_problems()
        eval_tokens = recipe.eval.max_completion_length or recipe.sampling.max_completion_length

        def run_eval(tag: str, iteration: int) -> dict[str, float]:
            result = evaluate_policy(
                sampler, tokenizer, task, eval_problems, recipe.eval, eval_tokens,
                seed=derive_seed(seed, "eval"), keep_eos_token=recipe.sampling.keep_eos_token,
            )  # fmt: skip
            if cluster.is_main:
                save_json(run_dir / f"eval_{tag}.json", {"iteration": iteration, **result})
            console.print(f"eval ({tag}, iteration {iteration}): " + _fmt(result, "eval/"))
            return result

        before = _read_json(run_dir / "eval_before.json")
        if recipe.eval.before_training and eval_problems and before is None:
            before = run_eval("before", 0)

        budget = recipe.train.time_budget_s
        # The budget counts the iterations' own time; a resumed run's earlier iterations count too. Every process
        # follows the main process's clock, so all stop after the same iteration.
        used = _iteration_seconds(run_dir, start - 1) if cluster.is_main and start > 1 else 0.0
        used = cluster.sum_floats({"used": used})["used"]
        last = start - 1 if budget is not None and used >= budget else recipe.train.iterations
        progress = _progress(console, recipe.logging.progress and cluster.is_main)
        wall0 = time.perf_counter()
        with progress:
            bar = progress.add_task("RL", total=recipe.train.iterations, completed=start - 1)
            for iteration in range(start, last + 1):
                t0 = time.perf_counter()
                if single_stream:
                    episodes, sample_stats = sample_single_stream(
                        sampler, tokenizer, task, recipe, iteration, params, tracker, pool
                    )
                else:
                    sample = sample_trees if tree else sample_episodes
                    episodes, sample_stats = sample(sampler, tokenizer, task, recipe, iteration, params)
                t_sample = time.perf_counter() - t0
                crash_point("sample", iteration)
                if tree and recipe.logging.save_episodes and cluster.is_main:
                    write_episodes(run_dir / "trees" / f"iter_{iteration:06d}.jsonl", episodes)
                sampled = episodes
                episodes = partition_episodes(episodes, recipe.partitioner, tokenizer)
                episodes, estimate_stats = estimate_advantages(episodes, recipe.estimator, state_values, critic_values)
                # Against the task's ground truth, on this iteration's own responses (before replay adds older ones).
                estimate_stats.update(estimated_credit(sampled, episodes))
                if replay is not None:
                    replay.add(episodes, iteration)
                    episodes = replay.draw(iteration, random.Random(derive_seed(seed, "replay", iteration)))
                    estimate_stats["replay/size"] = float(len(replay))
                if recipe.train.episodes_per_iteration is not None:
                    estimate_stats["episodes/unique"] = float(len(episodes))
                    rng = random.Random(derive_seed(seed, "fit", iteration))
                    episodes = fit_episode_count(episodes, recipe.train.episodes_per_iteration, rng)
                t1 = time.perf_counter()
                t_estimate = t1 - t0 - t_sample
                sampler.sleep()
                update = ppo_update(
                    learner, episodes,
                    loss=recipe.loss, train=recipe.train,
                    temperature=recipe.sampling.temperature, runtime=runtime, pad_id=tokenizer.pad_token_id,
                    rng=random.Random(derive_seed(seed, "shuffle", iteration)), ref_model=ref_model,
                    critic=critic, on_optimizer_step=lambda _: crash_point("optimize", iteration),
                )  # fmt: skip
                learner.refresh_inference_model()
                _check_finite_weights(model, iteration, run_dir)
                sampler.sync_weights()
                t_opt = time.perf_counter() - t1
                if tracker is not None:
                    # After the update, as the reference: rho measures how far the update moved the policy.
                    update.update(observe_outcomes(tracker, episodes, model, tokenizer, recipe, runtime, cluster))
                tokens = sample_stats.get("tree/generated_tokens", sum(len(ep.response_token_ids) for ep in sampled))
                record: dict[str, Any] = {
                    "iteration": iteration,
                    **rollout_metrics(sampled),
                    **update,
                    **sample_stats,
                    **estimate_stats,
                    **_segment_metrics(episodes),
                    "tokens_per_second": tokens / max(t_sample, 1e-9),
                    # Every token the policy generated this iteration: responses (or tree nodes) and Monte Carlo
                    # rollouts, what a comparison at equal sampled tokens counts.
                    "tokens/generated": tokens + estimate_stats.get("mc/generated_tokens", 0.0),
                    "time/sample_s": t_sample,
                    "time/estimate_s": t_estimate,
                    "time/optimize_s": t_opt,
                    "time/iteration_s": time.perf_counter() - t0,
                    # Wall time of this process's loop so far, logging and checkpoints included (a peer's
                    # per-step time measures the same).
                    "time/loop_elapsed_s": time.perf_counter() - wall0,
                }
                used_before = used
                used += cluster.sum_floats({"t": record["time/iteration_s"] if cluster.is_main else 0.0})["t"]
                if budget is not None and used >= budget and iteration < last:
                    console.print(f"time budget of {budget:g} s reached after iteration {iteration} ({used:.1f} s)")
                    last = iteration
                show = iteration == start or iteration % recipe.train.save_steps == 0
                if cluster.is_main:
                    if recipe.logging.save_episodes:
                        write_episodes(run_dir / "episodes" / f"iter_{iteration:06d}.jsonl", episodes)
                    graded = [ep for ep in sampled if ep.reward is not None]
                    _log_completions(run_dir, graded, recipe.logging.log_completions, iteration, console, show)
                if _eval_due(recipe.eval, iteration, used_before, used) and iteration < last:
                    record.update(run_eval(f"iter_{iteration:06d}", iteration))
                if metrics_log is not None:
                    metrics_log.log(record)
                console.print(f"it {iteration}/{recipe.train.iterations}  " + _fmt(record))
                progress.update(bar, completed=iteration)
                if iteration % recipe.train.save_steps == 0 or iteration == last:
                    save_checkpoint(
                        run_dir, iteration, learner, tokenizer,
                        {"data_position": iteration * recipe.sampling.prompts_per_iteration, "seed": seed},
                        keep=recipe.train.save_total_limit,
                        extra_writers=extra_writers,
                    )  # fmt: skip
                if iteration == last:  # the time budget may end the run early
                    break
        after = None
        if recipe.eval.after_training and eval_problems:
            after = _read_json(run_dir / "eval_after.json") if start > last else None
            after = after or run_eval("after", last)
        summary = {
            "run_dir": str(run_dir),
            "iterations": last,
            # All of the run's iterations, also those before a resume (what train.time_budget_s counts).
            "rl_seconds": _iteration_seconds(run_dir, last) if cluster.is_main else None,
            "rl_seconds_this_start": time.perf_counter() - wall0,
            "eval_before": _strip(before),
            "eval_after": _strip(after),
            "final_checkpoint": str(latest_checkpoint(run_dir)),
        }
        if cluster.is_main:
            save_json(run_dir / "summary.json", summary)  # while the run still holds its directory's lock
        # No process leaves the group while another may still be in a collective (a process that tears its gloo
        # group down early can abort at exit). Only on success: after an error the launcher stops the others.
        cluster.barrier()
    if not cluster.is_main:
        return None
    if before and after:
        for key in ("greedy_accuracy", "sampled_accuracy"):
            if f"eval/{key}" in before:
                console.print(
                    f"[bold]held-out {key.replace('_', ' ')}: before RL {_with_se(before, key)} -> "
                    f"after RL {_with_se(after, key)}[/]"
                )
    return summary


def training_pool(sampler, tokenizer, task: Task, recipe: Recipe) -> list:
    """The finite training set single-stream SPO tracks, without prompts over sampling.max_prompt_length."""
    if task.train_pool is None:
        raise SpoUserError(
            "estimator.kind=single_stream tracks a value per training prompt, but this task draws fresh problems every "
            "iteration (arith: set task.train_pool_size)"
        )
    pool = task.train_pool(recipe.run.seed)
    limit = recipe.sampling.max_prompt_length
    if limit is not None:
        prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in pool]
        lengths = [len(ids) for ids in sampler.encode_prompts(prompts)]
        pool = [p for p, n in zip(pool, lengths) if n <= limit]
    if not pool:
        raise SpoUserError("single_stream: no training prompt fits sampling.max_prompt_length")
    return pool


def _tracker(
    recipe: Recipe, task: Task, sampler, tokenizer, pool: list, run_dir: Path, ckpt: Path | None, console: Console,
    max_context: int | None, cluster: Cluster = LOCAL,
):  # fmt: skip
    """Single-stream SPO's tracker: restored from the checkpoint when resuming, else initialised from the offline
    values (read from estimator.offline_values, or estimated now with the policy RL starts from)."""
    from spo_cli.offline_values import (
        DEFAULT_PROMPTS_PER_SHARD,
        estimate_offline_values,
        policy_identity,
        read_offline_values,
    )
    from spo_cli.tracker import PromptValueTracker

    spec = recipe.estimator
    keys = [task.format_prompt(p.question) for p in pool]
    if ckpt is not None:
        tracker = PromptValueTracker(spec)
        try:
            tracker.load(ckpt)
        except FileNotFoundError as exc:
            raise SpoUserError(f"--resume: {exc}") from None
        console.print(f"single_stream: restored {len(tracker)} prompt values from {ckpt}")
        return tracker
    if spec.offline_samples == 0:
        console.print(f"single_stream: offline_samples is 0: all {len(keys)} prompts start at Beta(0.5, 0.5)")
        return PromptValueTracker.uninformed(spec, keys)
    if spec.offline_values is not None:
        offline = read_offline_values(Path(spec.offline_values))
        source = spec.offline_values
    else:
        out = run_dir / "offline_values.json"
        console.print(f"single_stream: estimating offline values ({spec.offline_samples} responses per prompt) into {out}")
        offline = estimate_offline_values(
            recipe, task, sampler, tokenizer, out,
            samples_per_prompt=spec.offline_samples, max_scores_per_prompt=spec.offline_samples,
            prompts_per_shard=DEFAULT_PROMPTS_PER_SHARD,
            policy_label=policy_identity(recipe, run_dir / WARM_START_DIR if isinstance(recipe.warm_start, Sft) else None),
            max_context=max_context, log=console.print, cluster=cluster,
        )  # fmt: skip
        source = str(out)
    tracker = PromptValueTracker.from_offline_values(spec, {k: offline[k] for k in dict.fromkeys(keys) if k in offline}, recipe.run.seed)
    missing = sum(1 for k in keys if k not in tracker)
    few = sum(1 for k in dict.fromkeys(keys) if k in offline and len(offline[k]) < spec.offline_samples)
    console.print(f"single_stream: {len(tracker)} of {len(keys)} training prompts have offline values ({source})")
    if missing:
        console.print(
            f"[yellow]warning:[/] {missing} training prompts have no offline value: their sampling weight is 0, "
            "they are never drawn"
        )
    if few:
        console.print(
            f"[yellow]warning:[/] {few} prompts have fewer than {spec.offline_samples} offline scores: their initial "
            "value uses the scores they have"
        )
    return tracker


def observe_outcomes(
    tracker, episodes: list[Episode], model, tokenizer, recipe: Recipe, runtime, cluster: Cluster = LOCAL
) -> dict[str, float]:
    """Feed this step's rewards to the tracker, with rho measured on the updated policy (steps 7-8 of
    docs/algorithms.md#single-stream-order-of-one-step).

    Every process holds the same tracker and feeds it the same outcomes; the scoring passes are split between them.
    """
    import torch

    from spo_cli.policy import score_responses
    from spo_cli.tracker import stored_sample

    def score_part(pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        with torch.no_grad():
            logprobs, _ = score_responses(
                model, [p for p, _ in pairs], [r for _, r in pairs],
                pad_id=tokenizer.pad_token_id, temperature=recipe.sampling.temperature,
                batch_size=recipe.train.per_device_train_batch_size, device=runtime.device, autocast=runtime.autocast,
            )  # fmt: skip
        return logprobs

    def score(prompt_ids, response_ids) -> list[list[float]]:
        return cluster.map_shards(score_part, list(zip(prompt_ids, response_ids)))

    keys = [ep.metadata[BASELINE_KEY]["key"] for ep in episodes]
    if recipe.estimator.rho_mode == "kl":
        now = score([ep.prompt_token_ids for ep in episodes], [ep.response_token_ids for ep in episodes])
    else:
        now = [[] for _ in episodes]
    samples = [stored_sample(ep.prompt_token_ids, ep.response_token_ids, lp) for ep, lp in zip(episodes, now)]
    stats = tracker.observe(keys, [ep.reward for ep in episodes], samples, score)
    return tracker.metrics(keys, stats)


def _critic(recipe: Recipe, policy_model, tokenizer, ckpt: Path | None, runtime):
    """The value network of a gae or segment_gae run: restored from the checkpoint when resuming, else built
    from the policy RL starts from (after the warm start). None for estimators without a critic, including
    segment_gae with `critic: null`."""
    from spo_cli.critic import CRITIC_DIR, build_critic, load_critic

    spec = recipe.estimator.critic if isinstance(recipe.estimator, (Gae, SegmentGae)) else None
    if spec is None:
        return None
    if ckpt is not None:
        if not (ckpt / CRITIC_DIR).is_dir():
            raise SpoUserError(
                f"--resume: checkpoint {ckpt} has no {CRITIC_DIR}/: it was not written by a run with a critic"
            )
        critic = load_critic(ckpt / CRITIC_DIR, spec, recipe.optim, device=runtime.device)
    else:
        critic = build_critic(
            policy_model, spec, recipe.optim, vocab_size=len(tokenizer), seed=recipe.run.seed, device=runtime.device
        )
    if recipe.hardware.gradient_checkpointing:
        critic.model.backbone.gradient_checkpointing_enable()
    return critic


def _critic_values(critic, recipe: Recipe, tokenizer, runtime, cluster: Cluster = LOCAL):
    """The critic's values of episodes, each process valuing its share."""
    from spo_cli.critic import episode_values

    if critic is None:
        return None
    values = episode_values(
        critic.model,
        pad_id=tokenizer.pad_token_id,
        batch_size=recipe.train.per_device_train_batch_size,
        device=runtime.device,
        autocast=runtime.autocast,
    )
    return lambda episodes: cluster.map_shards(values, episodes)


def _critic_writer(critic):
    """What `save_checkpoint` calls to put the critic into a checkpoint (None: nothing to write)."""
    if critic is None:
        return None
    from spo_cli.critic import CRITIC_DIR, save_critic

    return lambda checkpoint_dir: save_critic(critic, checkpoint_dir / CRITIC_DIR)


def _check_resume_world(state: dict[str, Any], ckpt: Path, cluster: Cluster, accelerator) -> None:
    """DeepSpeed's optimizer shards load only into the number of processes that wrote them."""
    saved = int(state.get("world_size", 1))
    if accelerator is not None and accelerator.state.deepspeed_plugin is not None and saved != cluster.world_size:
        raise SpoUserError(world_mismatch(ckpt, saved, cluster.world_size))


def _end_processes() -> None:
    """Leave the process group (without it, ZeRO-3 processes abort at exit:
    docs/software_stack.md#deepspeed-and-the-process-group-at-exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _engine_name(accelerator) -> str:
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return "DDP"
    return f"DeepSpeed ZeRO-{plugin.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}"


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def _check_finite_weights(model, iteration: int, run_dir: Path) -> None:
    """Stop before a checkpoint of non-finite weights is written (a learning rate far too high for the model): every
    later iteration would sample from NaN probabilities. Skipped fp16 overflow steps leave the weights finite."""
    import torch

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


def _iteration_seconds(run_dir: Path, through: int) -> float:
    """Time the logged iterations up to `through` used (what `train.time_budget_s` counts)."""
    from spo_cli.metrics import read_records

    records = read_records(run_dir / "metrics.jsonl")
    return sum(r.get("time/iteration_s", 0.0) for r in records if r.get("iteration", 0) <= through)


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
        from rich.panel import Panel
        from rich.text import Text

        ep = shown[0]
        body = Text(ep.prompt) + Text(ep.response, style="bold")
        console.print(Panel(body, title=f"iteration {iteration}, reward {ep.reward:g}", expand=False))


def _progress(console: Console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
