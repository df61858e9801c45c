"""Record loading: local JSONL errors name file:line / the recipe field; the Hub fails fast offline."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.tasks import data

HINT = "task.train_file: ../shared/data/gsm8k/train.jsonl"


def test_loads_records_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text('{"question": "q1", "answer": "#### 1"}\n\n{"question": "q\\u00e9"}\n', encoding="utf-8")
    assert data.load_jsonl_records(path, "task.train_file") == [
        {"question": "q1", "answer": "#### 1"},
        {"question": "qé"},
    ]
    assert data.load_jsonl_records(str(path), "task.train_file")[1]["question"] == "qé"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,}\n{"a": 3}\n')
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2: invalid JSON")):
        data.load_jsonl_records(path, "task.train_file")


def test_non_object_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        data.load_jsonl_records(path, "task.train_file")


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2:")):
        data.load_jsonl_records(path, "task.eval_file")


def test_missing_file_names_field(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(SpoUserError, match=r"`task\.eval_file`: file not found: .*nope\.jsonl"):
        data.load_jsonl_records(path, "task.eval_file")


def test_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(SpoUserError, match=r"`task\.train_file`: cannot read"):
        data.load_jsonl_records(tmp_path, "task.train_file")


def _load_gsm8k_from_hub() -> None:
    data.load_hub_records("openai/gsm8k", "main", "train", "task.dataset_name", HINT)


def test_hub_offline_env_fails_fast_naming_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Only effective if datasets is not imported yet; keeps a first import off the home cache.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(SpoUserError) as excinfo:
        _load_gsm8k_from_hub()
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "'openai/gsm8k'" in message and "`task.dataset_name`" in message and HINT in message


def test_hub_unreachable_fails_fast_and_restores_offline_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    # Pretend the libraries were imported online, so only the probe can keep them off the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert not data.hub_reachable(timeout=1.0)
    start = time.monotonic()
    expected = r"cannot reach the Hugging Face Hub .*`task\.dataset_name`.*127\.0\.0\.1:9"
    with pytest.raises(SpoUserError, match=expected):
        _load_gsm8k_from_hub()
    assert time.monotonic() - start < 5
    assert datasets.config.HF_HUB_OFFLINE is False
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
