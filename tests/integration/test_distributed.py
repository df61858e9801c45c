"""Data-parallel training on CPU (gloo): two processes under DDP or DeepSpeed ZeRO train exactly like one.

Every process samples its share of each call with the randomness the one-process run gives those requests, and
the optimizer step sums the processes' shares of each mini-batch, so a two-process run with half the per-device
batch matches a one-process run up to float rounding. The runs are launched the way users launch them: `spo train`
re-executes itself under `accelerate launch`.

The runs start from a committed warm start (tests/assets/tiny_distributed: `spo sft` of this file's one-process
recipe) through `warm_start.load_from`, rather than each fine-tuning its own; a warm start fine-tuned inside a ZeRO-2
launch is compared with one process by a slow test of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO, free_port, tiny_recipe_dict, write_recipe

# One-operation problems, a longer warm start and a KL term: every iteration trains (kl > 0 moves every episode).
SECTIONS = dict(
    train={"iterations": 4, "save_steps": 2, "save_total_limit": 1},
    task={"min_steps": 1, "max_steps": 1, "sft_min_steps": 1, "sft_max_steps": 1, "eval_steps": [1], "eval_per_step": 8},
    warm_start={"steps": 300, "batch_size": 16, "log_every": 100},
    sampling={"prompts_per_iteration": 8},
    loss={"beta": 0.01},
)
COMPARED = ["reward", "accuracy", "policy_loss", "grad_norm", "entropy", "kl", "clip_ratio", "learning_rate"]
# `spo sft` of `recipe(tmp, "one")` (how to make it again: tests/assets/tiny_distributed/README.md). Copying it saves
# every run of this file its 300-step warm start (~10 s each on an idle core, several times that beside other tests).
WARM_START = REPO / "tests" / "assets" / "tiny_distributed" / "warm_start"
FROM_WARM_START = f"warm_start.load_from={WARM_START}"


def recipe(tmp: Path, name: str, hardware: dict | None = None) -> Path:
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    if hardware:
        # Half the per-device batch on each of two processes: the same mini-batches as one process.
        sections["train"]["per_device_train_batch_size"] = 2
        sections["hardware"] = {"main_process_port": free_port(), **hardware}
    return write_recipe(tmp / f"{name}.yaml", tiny_recipe_dict(tmp / name, **sections))


def spo_train(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", "train", str(path), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert all(r["optimizer_steps"] > 0 for r in a), "every iteration must train for the comparison to mean much"
    for ra, rb in zip(a, b):
        assert ra["optimizer_steps"] == rb["optimizer_steps"]
        for key in COMPARED:
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-6), (ra["iteration"], key)


def max_weight_difference(dir_a: Path, dir_b: Path) -> float:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(dir_a, local_files_only=True)
    b = AutoModelForCausalLM.from_pretrained(dir_b, local_files_only=True)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference and the two-process ZeRO-2 run of the same recipe, from the committed warm start."""
    tmp = tmp_path_factory.mktemp("distributed")
    out = {}
    for name, hardware in [("one", None), ("zero2", {"num_processes": 2, "deepspeed": {"zero_stage": 2}})]:
        done = spo_train(recipe(tmp, name, hardware), FROM_WARM_START)
        assert done.returncode == 0, done.stderr[-4000:]
        out[name] = (tmp / name / "run", done)
    return tmp, out


def test_the_committed_warm_start_is_this_files_recipes(tmp_path):
    """`warm_start.load_from` checks the model and warm_start settings (the runs fail on a mismatch); the task and
    seed, which it allows to differ, must match too for the asset to be what its README says it is."""
    from spo_cli.recipe import WARM_START_RECORD, load_recipe, warm_start_differences, warm_start_record

    r = load_recipe(recipe(tmp_path, "one"), [FROM_WARM_START])
    recorded = json.loads((WARM_START / WARM_START_RECORD).read_text())
    wanted = warm_start_record(r.model, r.warm_start, r.task, r.run.seed)
    assert warm_start_differences(recorded, wanted) == [], "make the asset again (tests/assets/tiny_distributed)"
    assert recorded == wanted


@pytest.mark.slow
def test_a_warm_start_fine_tuned_under_zero2_is_the_one_process_one(tmp_path):
    """The other runs copy the committed warm start; here both fine-tune their own: under ZeRO-2 the main process
    makes it while the other waits, then trains from it in memory while the other loads the saved copy. (The full
    300 steps: after 60 no episode scores, the only gradient is the KL term's, which starts at zero, so rounding
    that Adam scales to full steps, and the two runs round differently.)"""
    one = spo_train(recipe(tmp_path, "one"))
    assert one.returncode == 0, one.stderr[-4000:]
    zero2 = spo_train(recipe(tmp_path, "zero2", {"num_processes": 2, "deepspeed": {"zero_stage": 2}}))
    assert zero2.returncode == 0, zero2.stderr[-4000:]
    assert "supervised fine-tuning for 300 steps" in zero2.stdout
    assert "2 processes (DeepSpeed ZeRO-2), backend gloo" in zero2.stdout
    a, b = tmp_path / "one" / "run", tmp_path / "zero2" / "run"
    assert max_weight_difference(a / "warm_start", b / "warm_start") < 1e-6
    assert_same_training(metrics(a), metrics(b), rel=1e-4)
    final = Path("checkpoints") / "iter_000004" / "model"
    assert max_weight_difference(a / final, b / final) < 1e-5


def test_two_processes_with_zero2_train_like_one(runs):
    _, out = runs
    (one, _), (zero2, done) = out["one"], out["zero2"]
    assert "accelerate.commands.launch --num_processes 2" in done.stderr
    assert "2 processes (DeepSpeed ZeRO-2), backend gloo" in done.stdout
    assert_same_training(metrics(one), metrics(zero2), rel=1e-4)
    assert done.stdout.count('"final_checkpoint"') == 1, "only the main process reports"
    # The checkpoint is a plain Hugging Face model (no DeepSpeed needed to read it) plus DeepSpeed's shards.
    ckpt = zero2 / "checkpoints" / "iter_000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "zero").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert max_weight_difference(one / "checkpoints" / "iter_000004" / "model", ckpt / "model") < 1e-5
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((zero2 / "summary.json").read_text())
    assert summary_one["eval_after"] == pytest.approx(summary_two["eval_after"])


def test_killed_zero2_run_resumes_to_the_same_result(runs):
    tmp, out = runs
    path = recipe(tmp, "killed", {"num_processes": 2, "deepspeed": {"zero_stage": 2}})
    run = tmp / "killed" / "run"
    # Its own session: the kill takes the launcher and both training processes at once, like a lost machine.
    proc = subprocess.Popen([sys.executable, "-m", "spo_cli", "train", str(path), FROM_WARM_START],
                            cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (run / "checkpoints" / "iter_000002").is_dir():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()

    # A DeepSpeed checkpoint's optimizer shards only fit the same number of processes: refused before launching.
    wrong = spo_train(path, FROM_WARM_START, "--resume", "hardware.num_processes=1")
    assert wrong.returncode == 2 and "hardware.num_processes=2" in wrong.stderr, wrong.stderr[-2000:]

    resumed = spo_train(path, FROM_WARM_START, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout
    assert_same_training(metrics(out["zero2"][0]), metrics(run), rel=1e-6)


@pytest.mark.parametrize(
    "name,hardware",
    [
        ("ddp", {"num_processes": 2}),
        # The shipped launch config (8 GPUs) with the process count overridden.
        ("zero3", {"num_processes": 2, "accelerate_config": str(REPO / "recipes" / "launch" / "zero3.yaml")}),
    ],
)
def test_ddp_and_zero3_train_like_one_process(runs, name, hardware):
    """ZeRO-3 partitions the parameters: each process samples from a full copy, refreshed after every step."""
    tmp, out = runs
    done = spo_train(recipe(tmp, name, hardware), FROM_WARM_START)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"2 processes ({'DDP' if name == 'ddp' else 'DeepSpeed ZeRO-3'})" in done.stdout
    one = out["one"][0]
    assert_same_training(metrics(one), metrics(tmp / name / "run"), rel=1e-4)
    ckpt = tmp / name / "run" / "checkpoints" / "iter_000004"
    assert max_weight_difference(one / "checkpoints" / "iter_000004" / "model", ckpt / "model") < 1e-5
