"""Weights & Biases logging (logging.report_to: [wandb]) in offline mode: the run is named after the recipe's run,
its config is the resolved recipe, its history holds the iterations' metrics, and a resumed run continues the same
W&B run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

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
    first_log, resumed_log = (wandb_records(next(d.glob(f"run-{run_id}.wandb"))) for d in offline)
    for log in (first_log, resumed_log):
        (run_record,) = [r.run for r in log if r.WhichOneof("record_type") == "run"]
        assert (run_record.run_id, run_record.display_name, run_record.project) == (run_id, "wandb_test", "spo-tests")
        assert list(run_record.tags) == ["ci"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["run"]["name"] == "wandb_test" and config["train"]["iterations"] == 3
    assert config["logging"]["wandb"]["project"] == "spo-tests"

    logged = [history_row(r.history) for log in (first_log, resumed_log) for r in log if r.HasField("history")]
    expected = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["_step"] for row in logged] == [row["iteration"] for row in expected] == [1, 2, 3]
    assert [row["reward"] for row in logged] == pytest.approx([row["reward"] for row in expected])
    assert not (run / "tensorboard").exists(), "report_to lists wandb only"


def history_row(history) -> dict:
    return {"_step": history.step.num} | {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                          for item in history.item}


def wandb_records(path) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks, each record
    split into chunks with a 7-byte header (crc32, little-endian length, chunk type: full, first, middle, last),
    each full record a protobuf `Record`. wandb ships no public reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32 * 1024, 7
    assert data[:4] == b":W&B", path
    records, position, pending = [], header, b""
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, chunk_type = struct.unpack("<IHB", data[position : position + header])
        chunk = data[position + header : position + header + length]
        position += header + length
        pending = chunk if chunk_type in (1, 2) else pending + chunk
        if chunk_type in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_report_to_wandb_without_wandb_installed_is_refused_before_the_run(tmp_path, monkeypatch):
    from spo_cli.errors import SpoUserError
    from spo_cli.metrics import check_report_to_installed
    from spo_cli.recipe import parse_recipe

    recipe = parse_recipe(tiny_recipe_dict(tmp_path, logging={"report_to": ["tensorboard", "wandb"]}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(SpoUserError, match=r"logging.report_to: wandb needs the wandb package"):
        check_report_to_installed(recipe)
