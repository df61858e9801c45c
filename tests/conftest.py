"""Shared fixtures: small local recipes (no network), tiny models and a repository-relative data path."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
# The real pretrained model (SmolLM2-135M-Instruct as a Hugging Face directory) that .ci/fetch_real_model converts
# from the package registry's GGUF file; tests that need it are marked real_model and skip without it.
REAL_MODEL_CACHE = Path(os.environ.get("SPO_REAL_MODEL_CACHE", REPO / ".cache"))
REAL_MODEL = REAL_MODEL_CACHE / "models" / "smollm2-135m-instruct"
REAL_MODEL_GGUF = REAL_MODEL_CACHE / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_MISSING = f"the real model is not in {REAL_MODEL_CACHE}: run .ci/fetch_real_model (docs/real_model.md)"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A seconds-scale version of the default job: a 0.1M-parameter model, a short warm start, tiny batches.
TINY_RECIPE = {
    "run": {"name": "test", "seed": 0},
    "model": {
        "kind": "tiny",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "task": {"kind": "arith", "min_steps": 1, "max_steps": 2, "eval_steps": [1, 2], "eval_per_step": 4},
    "warm_start": {"kind": "sft", "steps": 20, "batch_size": 8, "log_every": 10},
    "sampling": {"prompts_per_iteration": 4, "num_generations": 4, "max_completion_length": 24},
    "optim": {"learning_rate": 1e-4, "lr_scheduler_type": "linear", "warmup_steps": 1},
    "train": {
        "iterations": 3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "ppo_epochs": 2,
        "save_steps": 1,
        "save_total_limit": 2,
    },
    "hardware": {"device": "cpu", "precision": "fp32", "num_threads": 1},
    "eval": {"num_samples": 2},
    "logging": {"report_to": ["tensorboard"], "progress": False, "log_completions": 1},
}


def tiny_recipe_dict(tmp_path: Path, **sections) -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    data["run"]["output_dir"] = str(tmp_path / "run")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe_file(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))


@pytest.fixture(scope="session")
def tiny_policy():
    """A random tiny Qwen2 model + byte tokenizer, built locally."""
    from spo_cli.models import build_byte_tokenizer, build_tiny_model
    from spo_cli.recipe import TinyModel

    tokenizer = build_byte_tokenizer()
    spec = TinyModel(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    model = build_tiny_model(spec, tokenizer, seed=0).eval()
    return model, tokenizer


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a multi-process test run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requires_shared_data(*parts: str):
    return pytest.mark.skipif(not DATA.joinpath(*parts).exists(), reason=f"{DATA.joinpath(*parts)} not present")


def spo_in_process(*argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `spo ARGV...` through the real entry point, in this process (a subprocess would import
    torch again each time)."""
    from spo_cli.cli import main

    err, old = io.StringIO(), sys.argv
    sys.argv = ["spo", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    return code, err.getvalue()
