"""The policy a command starts from: the recipe's model (built or loaded), or the run's warm start (made once by
supervised fine-tuning, or copied from `warm_start.load_from`). Shared by `spo train`, `spo sft`, the standalone
stages and `spo eval`, none of which needs the training loop to load a policy."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_cli.distributed import LOCAL, Cluster
from spo_cli.errors import SpoUserError
from spo_cli.fsutil import publish_dir
from spo_cli.recipe import (
    WARM_START_RECORD, PretrainedModel, Recipe, Sft, TinyModel, warm_start_differences, warm_start_record,
)  # fmt: skip
from spo_cli.tasks import Task

if TYPE_CHECKING:
    from rich.console import Console

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
    from spo_cli.tools.calls import tool_markers

    policy = initial_policy(recipe)
    policy.model.to(runtime.device)
    spec = recipe.warm_start
    console.print(f"warm start: supervised fine-tuning for {spec.steps} steps")
    stats = run_sft(policy.model, policy.tokenizer, task, spec, runtime, recipe.run.seed, console.print,
                    markers=tool_markers(recipe.sampling.tools))  # fmt: skip
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


def load_policy(recipe: Recipe, policy_dir: Path | None, runtime):
    """(model, tokenizer): the checkpoint in `policy_dir` (HF format), else the recipe's model."""
    from spo_cli.models import load_checkpoint

    if policy_dir is not None:
        if not (policy_dir / "config.json").is_file():
            raise SpoUserError(f"--policy {policy_dir}: not a Hugging Face model directory (no config.json)")
        model, tokenizer = load_checkpoint(policy_dir)
    else:
        policy = initial_policy(recipe)
        model, tokenizer = policy.model, policy.tokenizer
    return model.to(runtime.device).eval(), tokenizer


def command_runtime(recipe: Recipe):
    """The device and precision of a standalone command, with the hub left alone unless the recipe names it."""
    from spo_cli.hardware import resolve_runtime

    set_offline_defaults(recipe)
    return resolve_runtime(recipe.hardware)
