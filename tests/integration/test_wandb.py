"""Weights & Biases logging (logging.report_to: [wandb]) in offline mode: the run is named after the recipe's run,
its config is the resolved recipe, its history holds the iterations' metrics, and a resumed run continues the same
W&B run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO, tiny_recipe_dict, write_recipe

pytest.importorskip("wandb")


def spo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "spo_cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_resumed_run_continues_its_offline_wandb_run(tmp_path):
    data = tiny_recipe_dict(
        tmp_path,
        run={"name": "wandb_test"},
        train={"iterations": 2},
        logging={"report_to": ["wandb"], "wandb": {"project": "spo-tests", "tags": ["ci"]}},
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    first = spo("train", str(recipe))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    run_id = (run / "wandb_run_id").read_text().strip()
    resumed = spo("train", str(recipe), "train.iterations=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "wandb_run_id").read_text().strip() == run_id

    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline), offline
    files = offline[-1] / "files"
    config = yaml.safe_load((files / "config.yaml").read_text())
    assert config["run"]["value"]["name"] == "wandb_test" and config["train"]["value"]["iterations"] == 3
    assert config["logging"]["value"]["wandb"]["project"] == "spo-tests"
    summary = json.loads((files / "wandb-summary.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["_step"] == 3 and summary["reward"] == pytest.approx(last["reward"])
    assert not (run / "tensorboard").exists(), "report_to lists wandb only"


def test_report_to_wandb_without_wandb_installed_is_refused_before_the_run(tmp_path, monkeypatch):
    from spo_cli.errors import SpoUserError
    from spo_cli.metrics import check_report_to_installed
    from spo_cli.recipe import parse_recipe

    recipe = parse_recipe(tiny_recipe_dict(tmp_path, logging={"report_to": ["tensorboard", "wandb"]}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(SpoUserError, match=r"logging.report_to: wandb needs the wandb package"):
        check_report_to_installed(recipe)
