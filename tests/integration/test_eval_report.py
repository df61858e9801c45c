"""`spo eval` and `spo report` on a tiny model trained here: the benchmark table, resuming, settings checks, plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from spo_cli.recipe import parse_recipe

from ..conftest import DATA, REPO, tiny_recipe_dict, write_recipe
from .test_chain import CHAIN

# test_chain's SPO-chain for three iterations, evaluated before, after and at every iteration in between.
CHAIN = {**CHAIN, "train": {"iterations": 3}, "eval": {"eval_steps": 1, "max_problems": 4}}


def spo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe file, run directory) of a finished 3-iteration SPO-chain run."""
    from spo_cli.train import train

    tmp = tmp_path_factory.mktemp("eval")
    data = tiny_recipe_dict(tmp, **CHAIN)
    train(parse_recipe(data), console=Console(file=open(os.devnull, "w")))
    return write_recipe(tmp / "recipe.yaml", data), tmp / "run"


def test_training_logs_evaluations_every_n_iterations(trained):
    _, run = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [("eval/greedy_accuracy" in r) for r in records] == [True, True, False]  # the last one is eval_after.json
    assert records[0]["eval/num_problems"] == 4
    assert json.loads((run / "eval_after.json").read_text())["iteration"] == 3


def test_eval_on_the_task_and_20_math500_problems_at_two_budgets(trained, tmp_path):
    recipe, run = trained
    out = tmp_path / "eval"
    result = spo(
        "eval", str(recipe), "--context", "256,512", "--datasets", "task,math500", "--data-dir", str(DATA),
        "--max-problems", "20", "--out", str(out), "--checkpoint", str(run / "warm_start"), "--checkpoint", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["checkpoint"], r["context"], r["dataset"]) for r in rows] == [
        (ckpt, ctx, ds) for ckpt in ("run/warm_start", "run/iter_000003") for ctx in ("256", "512") for ds in ("task-arith", "math500")
    ]
    for r in rows:
        assert r["num_problems"] == (4 if r["dataset"] == "task-arith" else 20)  # arith: eval_per_step 4 x 1 step
        lines = Path(r["completions"]).read_text().splitlines()
        assert len(lines) == r["num_problems"]
        record = json.loads(lines[0])
        assert set(record) >= {"prompt", "response", "answer", "correct", "gold", "finish_reason"}
        correct = [json.loads(line)["correct"] for line in lines]
        assert r["accuracy"] == pytest.approx(sum(correct) / len(correct))
        assert r["max_new_tokens"] == int(r["context"])
        budget_respected = all(json.loads(line)["response_tokens"] <= int(r["context"]) for line in lines)
        assert budget_respected
    # Table 1's layout: a row per (context, dataset), a column per checkpoint.
    table = (out / "table.md").read_text()
    assert "| context | dataset | run/warm_start | run/iter_000003 |" in table
    assert "| 512 | math500 |" in table
    assert "run/iter_000003" in result.stdout and "math500" in result.stdout
    # The 150-step warm start has learned the task's "#### answer" format (if not yet the arithmetic), so answers
    # are extracted; MATH500 is far beyond a 0.1M-parameter model.
    assert all(r["no_answer"] < 0.5 for r in rows if r["dataset"] == "task-arith")


def test_an_interrupted_eval_resumes_to_the_same_completions(trained, tmp_path):
    recipe, run = trained
    args = ["eval", str(recipe), "--context", "64", "--samples", "2", "--chunk-size", "3", "--temperature", "1.0"]
    full = spo(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    whole = (tmp_path / "full" / "run" / "iter_000003" / "task-arith@64.jsonl").read_text()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 4 * 2  # 4 problems x 2 samples; chunks of 3 problems = 6 lines

    # A kill during the second chunk's append: one whole chunk (6 lines), a line of the next and a torn one.
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    unit = tmp_path / "killed" / "run" / "iter_000003" / "task-arith@64"
    unit.with_suffix(".jsonl").write_text("".join(lines[:7]) + lines[7][:20])
    unit.with_suffix(".json").unlink()
    resumed = spo(*args, "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at problem 4 of 4" in resumed.stderr
    assert unit.with_suffix(".jsonl").read_text() == whole
    assert json.loads(unit.with_suffix(".json").read_text())["accuracy"] == json.loads(
        (tmp_path / "full" / "run" / "iter_000003" / "task-arith@64.json").read_text()
    )["accuracy"]
    for key in ("avg@2", "pass@2", "maj@2"):
        assert key in json.loads(unit.with_suffix(".json").read_text())

    # Other settings on the same output: refused with exit 2, unless --overwrite.
    unit.with_suffix(".jsonl").write_text("".join(lines[:6]))
    other = spo(*args[:-1], "0.7", "--out", str(tmp_path / "killed"))
    assert other.returncode == 2
    assert "temperature: 1.0 before, 0.7 now" in other.stderr and "--overwrite" in other.stderr
    redo = spo(*args[:-1], "0.7", "--out", str(tmp_path / "killed"), "--overwrite")
    assert redo.returncode == 0, redo.stderr


def test_a_budget_over_the_model_context_is_clipped_with_a_warning(tmp_path):
    data = tiny_recipe_dict(tmp_path, model={"max_position_embeddings": 96})
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    result = spo("eval", str(recipe), "--context", "1k", "--greedy", "--max-problems", "2", "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    assert "longer than the model's context of 96 tokens" in result.stderr
    (row,) = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    assert row["checkpoint"] == "recipe-model" and row["context"] == "1k" and row["max_new_tokens"] == 96
    records = [json.loads(line) for line in Path(row["completions"]).read_text().splitlines()]
    from spo_cli.models import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    assert all(len(tokenizer(r["prompt"])["input_ids"]) + r["response_tokens"] <= 96 for r in records)
    assert any(len(tokenizer(r["prompt"])["input_ids"]) + r["response_tokens"] == 96 for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "2x"], "--context: '2x' is not a token budget"),
        (["--datasets", "mmlu"], "unknown dataset 'mmlu'"),
        (["--greedy", "--samples", "4"], "--greedy with --samples > 1"),
        (["--checkpoint", "/no/such/dir"], "--checkpoint /no/such/dir: not a model directory"),
        (["--datasets", "gsm8k", "--data-dir", "/no/such/dir"], "/no/such/dir/gsm8k/test.jsonl does not exist"),
    ],
)
def test_eval_user_errors_exit_2(tiny_recipe_file, args, message):
    result = spo("eval", str(tiny_recipe_file), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_report_plots_runs_and_renders_credit_assignment(trained, tmp_path):
    _, run = trained
    out = tmp_path / "report"
    result = spo("report", f"chain={run}", f"chain={run}", "--out", str(out), "--episodes", "3")
    assert result.returncode == 0, result.stderr
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page  # self-contained: the plot is inside the page
    assert page.count('class="episode"') == 6  # 3 per run, the run given twice
    assert "iter 000003" in page and 'class="cut"' in page and "rgba(" in page
    assert "p &lt; 0.9" in page  # the run's cutpoint rho marks low-probability tokens
    assert "src=" not in page.replace("src='data:image/png", "")  # nothing loaded from elsewhere
    # The arithmetic task knows each wrong response's first error: the run logged the credit metrics.
    assert (out / "credit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "Credit against ground truth" in page

    missing = spo("report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such run directory" in missing.stderr
