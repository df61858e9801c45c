"""`spo eval` with `sampling.backend: vllm`: greedy completions are the HF backend's, budgets and all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..conftest import DATA, REPO, tiny_recipe_dict, write_recipe
from ._common import needs_vllm


def _eval(recipe: Path, out: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "spo_cli", "eval", str(recipe), "--greedy", "--context", "32,64",
         "--datasets", "task,math500", "--data-dir", str(DATA), "--max-problems", "4", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())["results"]


@needs_vllm
def test_vllm_eval_matches_the_hf_backend(tmp_path):
    # The untrained recipe model (head_dim 32, as vLLM's CPU attention needs), greedy: both engines pick the argmax.
    hf = write_recipe(tmp_path / "hf.yaml", tiny_recipe_dict(tmp_path / "hf"))
    vllm = write_recipe(tmp_path / "vllm.yaml", tiny_recipe_dict(tmp_path / "vllm", sampling={"backend": "vllm"}))
    rows_hf, rows_vllm = _eval(hf, tmp_path / "eval-hf"), _eval(vllm, tmp_path / "eval-vllm")
    assert [(r["dataset"], r["context"]) for r in rows_vllm] == [("task-arith", "32"), ("math500", "32"),
                                                                  ("task-arith", "64"), ("math500", "64")]  # fmt: skip
    for a, b in zip(rows_hf, rows_vllm):
        completions_hf = [json.loads(line) for line in Path(a["completions"]).read_text().splitlines()]
        completions_vllm = [json.loads(line) for line in Path(b["completions"]).read_text().splitlines()]
        assert [c["response"] for c in completions_vllm] == [c["response"] for c in completions_hf], (a["dataset"], a["context"])
        assert all(c["response_tokens"] <= int(b["context"]) for c in completions_vllm)
        assert b["accuracy"] == a["accuracy"]
