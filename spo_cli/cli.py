"""The `spo` command line. Thin: validate the recipe, import the stage lazily, call one function.

Nothing here imports torch at module level, so `spo --help` and `spo recipe check` stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from spo_cli.errors import SpoError, SpoUserError, from_os_error

app = typer.Typer(
    name="spo",
    help="Reinforcement learning of LLM reasoning with segment-level credit assignment, from typed YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Validate, show and document recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
model_app = typer.Typer(help="Prepare models for recipes.", no_args_is_help=True)
app.add_typer(model_app, name="model")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key.sub=value (values parsed as YAML), e.g. run.seed=1 optim.learning_rate=3e-5."),
]


OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Delete the files spo wrote in the run directory first (those its .spo-run manifest records; never a "
        "directory that is not a spo run). Refuses, naming them, when the run directory holds files spo did not write.",
    ),
]
OverwriteForeignOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite-foreign-files",
        help="With --overwrite: also delete the files spo did not write in the run directory (your notes, copies, "
        "other runs inside it); symlinks are removed, never followed.",
    ),
]


EvalOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output directory; default <run_dir>/eval. spo eval writes only into a new or empty directory or its "
        "own earlier output (marked .spo-eval), one eval at a time, and refuses one holding files it did not write.",
    ),
]
EvalOverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Redo the results of this evaluation already in the output directory: deletes and rewrites only the "
        "files spo eval wrote there.",
    ),
]

def _load(path: Path, overrides: list[str] | None):
    from spo_cli.recipe import load_recipe

    return load_recipe(path, overrides or [])


def _check_output_file(out: Path, example: str) -> None:
    """Refuse an --out that is a directory before any work: the file is written beside it and renamed onto it."""
    if out.is_dir():
        raise SpoUserError(f"--out {out} is a directory: name the file to write, e.g. {out / example}")


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the recipe's output directory from its last checkpoint.")] = False,
    overwrite: OverwriteOpt = False,
    overwrite_foreign: OverwriteForeignOpt = False,
) -> None:
    """Run the loop sample -> partition -> estimate -> optimize (after an optional warm start).

    A recipe whose `hardware` asks for several processes, machines or DeepSpeed re-executes this command under
    `accelerate launch` (or the `deepspeed` launcher), one process per device.
    """
    spec = _load(recipe, overrides)
    from spo_cli.launch import already_launched, needs_launch, relaunch
    from spo_cli.rundir import check_not_locked, check_run_dir

    # Refused before torch is imported; and with exit code 2 once, not once per launched process.
    check_run_dir(spec, resume, overwrite, overwrite_foreign)
    if not already_launched(os.environ):  # a launched process's main process takes the lock (or its launcher has)
        check_not_locked(spec.run.run_dir)
    if needs_launch(spec.hardware, os.environ):
        from spo_cli.launch import check_launcher_installed
        from spo_cli.rundir import claim_run_dir, remove_failed_start
        from spo_cli.sample import check_backend_installed

        check_backend_installed(spec.sampling)
        check_launcher_installed(spec.hardware)
        # This process becomes the launcher and holds the run directory's lock for all the processes it starts.
        lock, launch_env = claim_run_dir(spec, resume, overwrite, os.environ, overwrite_foreign), {}
        if lock is not None:
            lock.pass_to_launched(launch_env)
        flags = ["--resume"] * resume + ["--overwrite"] * overwrite + ["--overwrite-foreign-files"] * overwrite_foreign
        try:
            relaunch(spec.hardware, ["train", str(recipe), *(overrides or []), *flags], launch_env)
        except BaseException:
            if not resume:
                remove_failed_start(spec.run.run_dir)
            raise
    from spo_cli.train import train as run_train

    summary = run_train(spec, resume=resume, overwrite=overwrite, overwrite_foreign=overwrite_foreign)
    if summary is not None:
        typer.echo(json.dumps(summary, indent=2))


@app.command()
def sft(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: OverwriteOpt = False,
    overwrite_foreign: OverwriteForeignOpt = False,
) -> None:
    """Run only the recipe's supervised warm start; saves <run_dir>/warm_start, which `spo train --resume` reuses
    and other runs start from with `warm_start.load_from=<run_dir>/warm_start`."""
    spec = _load(recipe, overrides)
    from spo_cli.recipe import Sft

    if not isinstance(spec.warm_start, Sft):
        raise SpoUserError(f"{recipe}: `warm_start.kind` is {spec.warm_start.kind!r}; `spo sft` needs kind: sft")
    if spec.warm_start.load_from is not None:
        raise SpoUserError(
            f"{recipe}: `warm_start.load_from` is set ({spec.warm_start.load_from}): that warm start is made already; "
            "unset it to train one"
        )
    from rich.console import Console

    from spo_cli.hardware import resolve_runtime
    from spo_cli.tasks import build_task
    from spo_cli.rundir import run_directory
    from spo_cli.policy_loading import set_offline_defaults, warm_started_policy

    set_offline_defaults(spec)
    runtime = resolve_runtime(spec.hardware)
    task = build_task(spec.task, spec.sampling.prompts_per_iteration)
    with run_directory(spec, resume=False, overwrite=overwrite, overwrite_foreign=overwrite_foreign) as run_dir:
        warm_started_policy(spec, run_dir, task, runtime, Console())
    typer.echo(str(run_dir / "warm_start"))


PolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Hugging Face model directory of the policy that sampled the episodes (e.g. <run_dir>/warm_start or "
        "<run_dir>/checkpoints/iter_000003/model); default: the recipe's model.",
    ),
]


@app.command()
def partition(
    recipe: RecipeArg,
    input: Annotated[Path, typer.Option("--in", help="Episodes JSONL to read.")],
    output: Annotated[Path, typer.Option("--out", help="Episodes JSONL to write (with segments).")],
    overrides: OverridesArg = None,
    policy: PolicyOpt = None,
) -> None:
    """Cut the responses of saved episodes into segments with the recipe's partitioner.

    Episodes without log-probabilities (from another tool) are scored first with one batched forward pass.
    """
    _check_output_file(output, "episodes.jsonl")
    spec = _load(recipe, overrides)
    from spo_cli.standalone import partition_file

    count = partition_file(spec, input, output, policy, typer.echo)
    typer.echo(f"wrote {count} episodes to {output}")


# The options of `spo estimate-values --offline` (single-stream SPO's offline prompt values).
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Single-stream SPO's offline prompt values instead: sample responses for every training prompt of the "
        "recipe's task from --policy with the recipe's eval sampling settings and write {prompt: \\[score, ...]} to "
        "--out. Resumable: finished shards in <out>.shards/ are kept (also after the merge) and skipped by a re-run.",
    ),
]
SamplesPerPromptOpt = Annotated[
    int | None,
    typer.Option(
        "--samples-per-prompt",
        help="--offline: responses per prompt; default estimator.offline_samples (single_stream), else 8.",
        min=1,
    ),
]
PromptsPerShardOpt = Annotated[
    int | None,
    typer.Option("--prompts-per-shard", help="--offline: prompts per shard, the unit a re-run resumes at; default 256.", min=1),
]
MaxScoresPerPromptOpt = Annotated[
    int | None,
    typer.Option(
        "--max-scores-per-prompt",
        help="--offline: keep at most this many scores per prompt (a seeded random sample); default 8.",
        min=1,
    ),
]


@app.command("estimate-values")
def estimate_values(
    recipe: RecipeArg,
    output: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Episodes JSONL to write (with segment and token advantages); with --offline, the values JSON "
            "{prompt: \\[score, ...]} (finished shards are kept in <out>.shards/, which a re-run resumes from).",
        ),
    ],
    overrides: OverridesArg = None,
    input: Annotated[
        Path | None,
        typer.Option("--in", help="Partitioned episodes JSONL to read (mc_tree: or a prompt file); required unless --offline."),
    ] = None,
    policy: PolicyOpt = None,
    critic: Annotated[
        Path | None,
        typer.Option(
            "--critic",
            help="A gae or segment_gae run's saved critic, <run_dir>/checkpoints/iter_N/critic with N the episodes' "
            "iteration - 1 (estimator.kind=gae, or segment_gae with a critic).",
        ),
    ] = None,
    iteration: Annotated[
        int | None,
        typer.Option(
            "--iteration",
            help="mc_tree on a prompt file: grow the trees with the seeds of this training iteration; default 1.",
            min=0,
        ),
    ] = None,
    offline: OfflineOpt = False,
    samples_per_prompt: SamplesPerPromptOpt = None,
    prompts_per_shard: PromptsPerShardOpt = None,
    max_scores_per_prompt: MaxScoresPerPromptOpt = None,
) -> None:
    """Fill segment advantages of saved, partitioned episodes with the recipe's estimator.

    Monte Carlo estimators sample continuations from --policy with the recipe's sampling settings and the
    seed a training run would use for the episodes' iteration, so they reproduce `spo train`'s advantages.
    gae and segment_gae (with a critic) read the values of the critic given with --critic. mc_tree also takes
    a prompt file (JSONL rows with `question` or `prompt`, and `gold`): it grows a tree per prompt with --policy
    and writes the edge episodes.

    With --offline (no --in) it writes single-stream SPO's offline prompt values instead: --samples-per-prompt
    responses for every training prompt, scored, as the JSON {prompt: \\[score, ...]} that estimator.offline_values
    reads. Shards of --prompts-per-shard prompts are saved in <out>.shards/ as they finish and are kept after the
    merge; a re-run with the same settings skips them, so a killed run resumes.
    """
    given = {"--in": input, "--critic": critic, "--iteration": iteration, "--samples-per-prompt": samples_per_prompt,
             "--prompts-per-shard": prompts_per_shard, "--max-scores-per-prompt": max_scores_per_prompt}  # fmt: skip
    _check_estimate_mode(offline, {name for name, value in given.items() if value is not None})
    _check_output_file(output, "values.json" if offline else "episodes.jsonl")
    spec = _load(recipe, overrides)
    if offline:
        from spo_cli.estimate.single_stream.offline_values import offline_values_file

        values = offline_values_file(
            spec, output, policy, typer.echo, samples_per_prompt=samples_per_prompt,
            prompts_per_shard=prompts_per_shard, max_scores_per_prompt=max_scores_per_prompt,
        )  # fmt: skip
        typer.echo(f"wrote offline values of {len(values)} prompts to {output}")
        return
    from spo_cli.standalone import estimate_file

    stats = estimate_file(spec, input, output, policy, typer.echo, critic, 1 if iteration is None else iteration)
    typer.echo(f"wrote {int(stats.pop('episodes'))} episodes to {output}" + "".join(f"  {k} {v:g}" for k, v in stats.items()))


# `spo estimate-values` has two modes; each flag belongs to one.
ESTIMATE_MODE_FLAGS = {
    "episodes": ("--in", "--critic", "--iteration"),
    "--offline": ("--samples-per-prompt", "--prompts-per-shard", "--max-scores-per-prompt"),
}


def _check_estimate_mode(offline: bool, given: set[str]) -> None:
    """Refuse a flag of the other mode of `spo estimate-values`, saying which mode takes it, and a missing --in."""
    mode, other = ("--offline", "episodes") if offline else ("episodes", "--offline")
    foreign = [flag for flag in ESTIMATE_MODE_FLAGS[other] if flag in given]
    if foreign and offline:
        raise SpoUserError(
            f"{', '.join(foreign)}: only when estimating saved episodes (--in), not with --offline, which samples the "
            "recipe's training prompts with --policy"
        )
    if foreign:
        raise SpoUserError(f"{', '.join(foreign)}: only with --offline (single-stream SPO's offline prompt values)")
    if mode == "episodes" and "--in" not in given:
        raise SpoUserError(
            "missing --in (the episodes or prompt file to read); or pass --offline for single-stream SPO's offline "
            "prompt values"
        )


# The options of `spo eval` that need more than a line.
ContextOpt = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="Generation budgets (new tokens), comma-separated: 2k,4k,32k or 4096. A budget over the model's context "
        "is clipped to it, with a warning. Default: eval.max_completion_length, else sampling.max_completion_length.",
    ),
]
DatasetsOpt = Annotated[
    str,
    typer.Option(
        "--datasets",
        help="Comma-separated: `task` (the recipe's held-out problems), gsm8k, math500, aime24, math, or NAME=PATH.jsonl "
        "(a local file in that benchmark's format). Benchmarks come from --data-dir, else the Hugging Face Hub.",
    ),
]
EvalCheckpointOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--checkpoint",
        help="A model directory, a checkpoint (<run_dir>/checkpoints/iter_N) or a run directory (its latest "
        "checkpoint); repeat it for a table with a column per checkpoint. Default: the recipe run's latest "
        "checkpoint, else its warm start, else the recipe's model.",
    ),
]


@app.command("eval")
def eval_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    context: ContextOpt = None,
    datasets: DatasetsOpt = "task",
    checkpoint: EvalCheckpointOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Completions per problem (K): reports avg@K, pass@K, maj@K.")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature (open-r1's long-CoT default).")] = 0.6,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (open-r1's long-CoT default).")] = 0.95,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (temperature 0, one completion per problem).")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Directory holding <benchmark>/test.jsonl files (default: $SPO_DATA_DIR), e.g. ../shared/data."),
    ] = None,
    max_problems: Annotated[int | None, typer.Option("--max-problems", min=1, help="Evaluate the first N problems of each set.")] = None,
    out: EvalOutOpt = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Problems sampled and saved together: the unit an interrupted eval resumes at.")
    ] = 32,
    overwrite: EvalOverwriteOpt = False,
) -> None:
    """Accuracy on held-out problems and benchmarks at several generation budgets (the paper's Table 1).

    Every completion is saved (prompt, response, extracted answer, correct) in the output directory, with a JSON
    result per checkpoint, set and budget, results.json and table.md. An interrupted eval resumes where it stopped.
    """
    from spo_cli.evaluate.benchmarks import parse_dataset_names
    from spo_cli.evaluate.metrics import parse_contexts

    _check_eval_sampling(samples, temperature, top_p, greedy)
    entries = parse_dataset_names(datasets)
    spec = _load(recipe, overrides)
    try:
        budgets = parse_contexts(context) if context else [spec.eval.max_completion_length or spec.sampling.max_completion_length]
    except ValueError as exc:
        raise SpoUserError(f"--context: {exc}") from None
    from spo_cli.evaluate.benchmarks import build_eval_sets
    from spo_cli.evaluate.runner import EvalSettings, evaluate_checkpoints, print_table, resolve_checkpoints
    from spo_cli.policy_loading import set_offline_defaults

    checkpoints = resolve_checkpoints(spec, checkpoint or [])
    out_dir = out or spec.run.run_dir / "eval"
    from spo_cli.rundir import check_eval_out

    check_eval_out(out_dir)  # before any data or model is loaded
    settings = EvalSettings(
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy or temperature == 0 else top_p,
        samples=samples,
        seed=spec.run.seed,
        chunk_size=chunk_size,
    )
    sets = build_eval_sets(spec, entries, data_dir, max_problems)
    # After the data: a benchmark named without --data-dir comes from the Hub even when the recipe's own data does not.
    set_offline_defaults(spec)
    try:
        rows = evaluate_checkpoints(
            spec, checkpoints, sets, budgets, settings, out_dir,
            lambda message: typer.echo(message, err=True), overwrite,
        )
    finally:
        for s in sets:
            s.close()
    print_table(rows)


def _check_eval_sampling(samples: int, temperature: float, top_p: float, greedy: bool) -> None:
    from spo_cli.recipe import MIN_TEMPERATURE

    if greedy and samples > 1:
        raise SpoUserError("--greedy with --samples > 1 would repeat one completion; drop one of them")
    if not greedy and 0 < temperature < MIN_TEMPERATURE:
        raise SpoUserError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, as sampling.temperature")
    if not greedy and temperature == 0 and samples > 1:
        raise SpoUserError("--temperature 0 is greedy decoding: --samples must be 1")
    if not greedy and top_p == 0:
        raise SpoUserError("--top-p must be above 0")


@app.command()
def report(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Run directories, or LABEL=RUN_DIR: runs sharing a label (seeds of one method) are drawn as a mean with a "
            "min-max band.",
            show_default=False,
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Output directory; default <RUN_DIR>/report for one run, else ./report.")] = None,
    iteration: Annotated[
        int | None, typer.Option("--iteration", min=1, help="Show the episodes of this iteration; default the last saved.")
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", min=0, help="Responses shown per run in the credit-assignment view.")] = 4,
    low_prob: Annotated[
        float | None,
        typer.Option(
            "--low-prob", min=0.0, max=1.0,
            help="Mark tokens sampled with probability below this; default the run's cutpoint rho (SPO-chain), else 0.5.",
        ),
    ] = None,  # fmt: skip
    smooth: Annotated[int, typer.Option("--smooth", min=0, help="Moving-average window of the reward curves; 0 = a twentieth of the run.")] = 0,
    accuracy: Annotated[
        str | None,
        typer.Option("--accuracy", help="Held-out accuracy to plot: greedy or sampled; default greedy where a run has it."),
    ] = None,
) -> None:
    """Plots of held-out accuracy and reward against iteration and wall time (curves.png) and a self-contained
    report.html with them and sampled responses coloured by advantage (the paper's credit-assignment view)."""
    from spo_cli.report import parse_run_args, write_report

    if accuracy not in (None, "greedy", "sampled"):
        raise SpoUserError(f"--accuracy: {accuracy!r} is neither greedy nor sampled")
    parsed = parse_run_args(runs)
    out_dir = out or (parsed[0][1] / "report" if len(parsed) == 1 else Path("report"))
    write_report(parsed, out_dir, iteration=iteration, episodes_per_run=episodes, low_prob=low_prob, smooth=smooth,
                 accuracy=accuracy, log=typer.echo)


@recipe_app.command("check")
def recipe_check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to validate.", show_default=False)],
) -> None:
    """Validate recipes; exit 0 if all are valid, 2 otherwise."""
    from spo_cli.recipe import load_recipe

    failed = 0
    for path in recipes:
        try:
            load_recipe(path)
            typer.echo(f"ok  {path}")
        except SpoUserError as exc:
            failed += 1
            typer.echo(f"error: {exc}", err=True)
    if failed:
        raise typer.Exit(2)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Print the recipe with every default filled in (what a run would use)."""
    from spo_cli.recipe import dump_recipe

    typer.echo(dump_recipe(_load(recipe, overrides)), nl=False)


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the JSON Schema of recipes (for editors and documentation)."""
    from spo_cli.recipe import recipe_schema as schema

    typer.echo(json.dumps(schema(), indent=2))


@model_app.command("import-gguf")
def model_import_gguf(
    file: Annotated[Path, typer.Argument(help="A GGUF model file (llama.cpp's format).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Hugging Face model directory to write (replaced if it exists).", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16: the weights' dtype.")] = "float32",
) -> None:
    """Convert a GGUF file into a Hugging Face model directory (config, safetensors weights, tokenizer with its chat
    template) that `model.name_or_path` can name: dequantized once instead of at every run's start."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SpoUserError(f"--dtype: {dtype!r} is none of float32, bfloat16, float16")
    import time

    import torch

    from spo_cli.models import import_gguf

    start = time.perf_counter()
    import_gguf(file, out, getattr(torch, dtype))
    typer.echo(f"wrote {out} ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except SpoError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # e.g. an output directory that is read-only: one line naming the path
        error = from_os_error(exc)
        if error is None:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except Exception as exc:  # click usage errors carry their own exit code (2)
        if isinstance(exc, _click_errors()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error class, and typer's vendored copy of it (typer >= 0.24 raises its own `typer._click`)."""
    import importlib

    found = []
    for module in ("click", "typer._click"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


if __name__ == "__main__":
    main()
