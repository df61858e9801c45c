"""GGUF files refused with the field named: a missing file, a file that is not GGUF, an architecture transformers
cannot read from GGUF. (A real GGUF model is converted and trained in tests/real_model.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spo_cli.errors import SpoUserError
from spo_cli.gguf_model import load_gguf
from spo_cli.recipe import parse_recipe

from ..conftest import REPO, tiny_recipe_dict, write_recipe

gguf = pytest.importorskip("gguf")


def gguf_file(path: Path, architecture: str) -> Path:
    """A small, valid GGUF file declaring `architecture`, with one tensor."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def pretrained(tmp_path: Path, directory: Path, name: str) -> dict:
    data = tiny_recipe_dict(tmp_path)
    data["model"] = {"kind": "pretrained", "name_or_path": str(directory), "gguf_file": name, "dtype": "float32"}
    data["warm_start"] = {"kind": "none"}
    return data


def test_a_missing_gguf_file_is_a_recipe_error_naming_the_field(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", pretrained(tmp_path, tmp_path, "model.Q4_1.gguf"))
    out = subprocess.run([sys.executable, "-m", "spo_cli", "recipe", "check", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "model.gguf_file" in out.stderr and "no such file" in out.stderr and "model.Q4_1.gguf" in out.stderr
    with pytest.raises(Exception, match="a file name inside name_or_path"):
        parse_recipe(pretrained(tmp_path, tmp_path, "sub/model.gguf"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(SpoUserError, match=r"`model.gguf_file`: .*model.gguf is not a GGUF file"):
        load_gguf(fake, "model.gguf_file", dtype=None)
    with pytest.raises(SpoUserError, match=r"is a directory"):
        load_gguf(tmp_path, "model.gguf_file", dtype=None)


def test_an_architecture_transformers_cannot_read_exits_2_naming_the_field(tmp_path):
    gguf_file(tmp_path / "rwkv.gguf", "rwkv6")
    path = write_recipe(tmp_path / "r.yaml", pretrained(tmp_path, tmp_path, "rwkv.gguf"))
    out = subprocess.run([sys.executable, "-m", "spo_cli", "train", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "`model.gguf_file`" in out.stderr and "'rwkv6'" in out.stderr and "llama" in out.stderr
    assert "Traceback" not in out.stderr


def test_import_gguf_refuses_a_non_gguf_file_with_exit_2(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGML" + bytes(100))
    out = subprocess.run([sys.executable, "-m", "spo_cli", "model", "import-gguf", str(fake), "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "not a GGUF file" in out.stderr
    assert not (tmp_path / "o").exists()
