"""Damaged and unwritable files never get a traceback: a damaged checkpoint, pickled model weights, an existing
`spo report --out`, read-only output directories, data rows of the wrong type; and math answers too long for
Python's int-string conversion are still graded."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from spo_cli.episode import write_episodes

from ..conftest import spo_in_process, tiny_recipe_dict, write_recipe
from .test_episode import make_episode



def error_line(err: str) -> str:
    """The one `error:` line of a failed command's stderr (progress lines may come before it), with no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


class _RunsCode:
    """Unpickling this creates a file: what a booby-trapped pytorch_model.bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_policy) -> Path:
    """A tiny model saved as spo saves checkpoints (config.json, model.safetensors, tokenizer)."""
    from spo_cli.models import save_model

    path = tmp_path_factory.mktemp("model") / "model"
    save_model(*tiny_policy, path)
    return path


def _pickled_only(model_dir: Path, dest: Path, marker: Path) -> Path:
    """A copy of `model_dir` whose weights are a pickle that would create `marker` if anything unpickled it."""
    shutil.copytree(model_dir, dest)
    (dest / "model.safetensors").unlink()
    (dest / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    return dest


# ------------------------------------------------------------------------------------- damaged checkpoints


def _bad_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "qwen2", ')


def _bad_value(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))


def _truncated_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])


def _truncated_data(d: Path) -> None:
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000])


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _impossible_size(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": 10**12}))


def _other_size(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))  # the weights hold 128


def _missing_tensor(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (_bad_json, "config.json", "not valid JSON (Expecting"),
        (_bad_value, "config.json", "not a valid model config: Validation error for field 'hidden_size'"),
        (_truncated_header, "model.safetensors", "truncated, or not a safetensors file (1000 bytes"),
        (_truncated_data, "model.safetensors", "bytes its header describes): copy it again"),
        (_no_weights, "", "no weights: a model directory holds model.safetensors"),
        (_impossible_size, "config.json", "hidden_size is 1000000000000, above 65536"),  # was: torch's RuntimeError
        (_other_size, "config.json",
         "gives model.layers.0.mlp.gate_proj.weight the shape [256, 64], but model.safetensors holds [128, 64]"),
        (_missing_tensor, "model.safetensors", "lacks model.layers.1.mlp.down_proj.weight"),  # was: exit 0
    ],
    ids=["config-not-json", "config-bad-value", "weights-truncated-header", "weights-truncated-data", "no-weights",
         "impossible-size", "size-of-other-weights", "missing-tensor"],
)
def test_eval_of_a_damaged_checkpoint_names_the_file(tmp_path, model_dir, damage, file, message):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    damage(damaged)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))
    code, err = spo_in_process("eval", str(recipe), "--checkpoint", str(damaged), "--out", str(tmp_path / "e"))
    assert code == 2, err
    line = error_line(err)
    assert f"{damaged / file}: " in line and message in line, line


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path, model_dir):
    marker = tmp_path / "pwned"
    pickled = _pickled_only(model_dir, tmp_path / "pickled", marker)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))
    code, err = spo_in_process("eval", str(recipe), "--checkpoint", str(pickled), "--out", str(tmp_path / "e"))
    assert code == 2, err
    line = error_line(err)
    assert f"{pickled}: holds only pickled PyTorch weights (pytorch_model.bin)" in line
    assert "spo loads only safetensors weights" in line and ".save_pretrained(" in line
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_pretrained_model_with_pickled_weights_is_refused(tmp_path, model_dir, command):
    """`model.kind: pretrained` naming a directory of pickled weights: refused where spo train and spo eval load it."""
    marker = tmp_path / "pwned"
    pickled = _pickled_only(model_dir, tmp_path / "pickled", marker)
    data = tiny_recipe_dict(tmp_path)
    data["warm_start"] = {"kind": "none"}
    data["model"] = {"kind": "pretrained", "name_or_path": str(pickled), "dtype": "float32"}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    extra = ["--max-problems", "1", "--out", str(tmp_path / "e")] if command == "eval" else []
    code, err = spo_in_process(command, str(recipe), *extra)
    assert code == 2, err
    line = error_line(err)
    assert f"`model.name_or_path`: {pickled}: holds only pickled PyTorch weights" in line, line
    assert "spo loads only safetensors weights" in line
    assert not marker.exists()


def test_a_garbled_trainer_state_names_the_file(tmp_path):
    from spo_cli.checkpoint import read_trainer_state
    from spo_cli.errors import SpoUserError

    ckpt = tmp_path / "checkpoints" / "iter_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"iteration": 2, "glob')
    with pytest.raises(SpoUserError, match=r"iter_000002/trainer_state.json: not valid JSON .*remove .*iter_000002"):
        read_trainer_state(ckpt)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run directory) of a one-iteration tiny run with its checkpoint, to damage copies of."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tiny_recipe_dict(tmp)
    data["warm_start"] = {"kind": "none"}
    data["train"].update(iterations=1, ppo_epochs=1)
    data["sampling"].update(prompts_per_iteration=2, num_generations=2, max_completion_length=8)
    data["eval"] = {"before_training": False, "after_training": False}
    data["logging"]["report_to"] = []
    recipe = write_recipe(tmp / "recipe.yaml", data)
    code, err = spo_in_process("train", str(recipe))
    assert code == 0, err
    return recipe, tmp / "run"


def _resume_damaged(tmp_path: Path, trained_run: tuple[Path, Path], damage) -> str:
    """The error line of `spo train --resume` on a copy of the trained run damaged by `damage(run_dir)`; the run
    directory is left as it was (nothing half-made, so a retry after the repair works)."""
    recipe, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    code, err = spo_in_process("train", str(recipe), f"run.output_dir={copy}", "train.iterations=2", "--resume")
    assert code == 2, err
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before
    return error_line(err)


def test_resuming_from_a_checkpoint_of_impossible_size_names_the_field(tmp_path, trained_run):
    config = tmp_path / "run" / "checkpoints" / "iter_000001" / "model" / "config.json"
    line = _resume_damaged(tmp_path, trained_run, lambda run: _impossible_size(config.parent))
    assert f"{config}: hidden_size is 1000000000000, above 65536" in line, line


def test_resuming_with_a_garbled_metrics_line_names_file_and_line(tmp_path, trained_run):
    metrics = tmp_path / "run" / "metrics.jsonl"

    def garble(run: Path) -> None:
        metrics.write_text("garbage{\n" + metrics.read_text())

    line = _resume_damaged(tmp_path, trained_run, garble)
    assert f"{metrics}:1: not valid JSON (Expecting value)" in line and "delete the line" in line, line


# ------------------------------------------------------------------------------------------ spo report --out


def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    records = [{"iteration": i, "reward": 0.1 * i, "time/iteration_s": 1.0} for i in (1, 2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_out_that_is_a_file_is_refused_and_kept(tmp_path):
    run = _run_dir(tmp_path / "run")
    mine = tmp_path / "report.html"
    mine.write_text("my own notes")
    code, err = spo_in_process("report", str(run), "--out", str(mine))
    assert code == 2, err
    line = error_line(err)
    assert f"--out {mine}: is a file" in line and mine.read_text() == "my own notes"


def test_report_replaces_its_own_earlier_report_but_no_one_elses(tmp_path):
    run = _run_dir(tmp_path / "run")
    out = tmp_path / "out"
    assert spo_in_process("report", str(run), "--out", str(out))[0] == 0
    first = (out / "report.html").read_text()
    (out / "report.html").write_text(first.replace("spo report</h1>", "spo report</h1><!-- stale -->"))
    code, err = spo_in_process("report", str(run), "--out", str(out))  # an earlier spo report: replaced
    assert code == 0, err
    assert (out / "report.html").read_text() == first and not list(out.glob(".*tmp*"))

    for name in ("report.html", "curves.png"):
        theirs = tmp_path / f"theirs-{name}"
        theirs.mkdir()
        (theirs / name).write_text("someone else's")
        code, err = spo_in_process("report", str(run), "--out", str(theirs))
        assert code == 2, err
        line = error_line(err)
        assert f"{theirs / name} is not a file spo report wrote" in line
        assert (theirs / name).read_text() == "someone else's"


@pytest.mark.parametrize(
    "text",
    [b"\x89PNG\r\n" + bytes(range(256)), b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n",
     b"model: {kind: tiny}\npartitioner: 3\nsampling: [1]\n"],
    ids=["binary", "deep", "sections-not-mappings"],
)  # fmt: skip
def test_report_reads_the_runs_recipe_with_the_recipe_loader(tmp_path, text):
    run = _run_dir(tmp_path / "run")
    write_episodes(run / "episodes" / "iter_000001.jsonl", [make_episode()])
    (run / "recipe.resolved.yaml").write_bytes(text)
    code, err = spo_in_process("report", str(run), "--out", str(tmp_path / "report"))
    if b"partitioner: 3" in text:  # not this spo's layout (a run of another version): the defaults, as for none
        assert code == 0, err
    else:  # was: UnicodeDecodeError and RecursionError tracebacks
        assert code == 2, err
        assert f"error: {run / 'recipe.resolved.yaml'}:" in error_line(err)


@pytest.mark.parametrize("value", ['"0.5"', "null", "true", "[1]"])
def test_report_names_a_metrics_value_that_is_not_a_number(tmp_path, value):
    run = _run_dir(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"iteration": 3, "reward": %s, "time/iteration_s": 1.0}\n' % value)
    code, err = spo_in_process("report", str(run), "--out", str(tmp_path / "report"))
    assert code == 2, err  # was: a TypeError or ValueError traceback from float()
    assert error_line(err).startswith(f"error: {run / 'metrics.jsonl'}: iteration 3: reward is ")


# ------------------------------------------------------------------------------- --out of a command writing a file


@pytest.mark.parametrize("command", ["partition", "estimate-values"])
def test_out_that_is_a_directory_is_refused_up_front(tmp_path, command):
    episodes = tmp_path / "episodes.jsonl"
    write_episodes(episodes, [make_episode(id=str(i), group_id="g", reward=float(i % 2)) for i in range(2)])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    code, err = spo_in_process(command, str(recipe), "--in", str(episodes), "--out", str(out))
    assert code == 2, err
    example = out / "episodes.jsonl"
    assert error_line(err) == f"error: --out {out} is a directory: name the file to write, e.g. {example}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episodes.jsonl", "out", "recipe.yaml"]


def test_atomic_writes_over_a_directory_leave_no_temporary_file(tmp_path):
    from spo_cli.fsutil import atomic_write_text

    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_text(tmp_path / "out", "text")
    assert info.value.filename == str(tmp_path / "out") and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------- unwritable directories


def _permissions_enforced(tmp_path: Path) -> bool:
    """Whether this user is stopped by a read-only directory (root, or a process with CAP_DAC_OVERRIDE, is not)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "file").write_text("")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


@pytest.fixture
def read_only_dir(tmp_path):
    if not _permissions_enforced(tmp_path):
        pytest.skip("this user (root) writes into read-only directories, so they cannot be tested")
    path = tmp_path / "read-only"
    path.mkdir()
    yield path
    path.chmod(0o755)


def test_outputs_into_a_read_only_directory_end_in_one_line(tmp_path, read_only_dir, model_dir):
    recipe_data = tiny_recipe_dict(tmp_path)
    recipe_data["run"]["output_dir"] = str(read_only_dir / "run")
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data)
    episodes = tmp_path / "episodes.jsonl"
    write_episodes(episodes, [make_episode(id=str(i), group_id="g", reward=float(i % 2)) for i in range(2)])
    run = _run_dir(read_only_dir / "done")
    parted = read_only_dir / "parted.jsonl"
    read_only_dir.chmod(0o555)
    run.chmod(0o555)
    cases = [
        (["train", str(recipe)], read_only_dir / "run"),
        (["partition", str(recipe), "--in", str(episodes), "--out", str(parted)], parted),
        (["report", str(run)], run / "report"),  # the default --out, <RUN_DIR>/report
        (["eval", str(recipe), "--checkpoint", str(model_dir), "--out", str(read_only_dir / "eval")], read_only_dir),
    ]
    try:
        for argv, path in cases:
            code, err = spo_in_process(*argv)
            assert code == 2, (argv, err)
            line = error_line(err)
            assert f"{path}: Permission denied: " in line, (argv, line)
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/o.jsonl"), 2, "/data/o.jsonl: Permission denied: "),
        (OSError(errno.EROFS, "Read-only file system", "/data/o.jsonl"), 2, "/data/o.jsonl: Read-only file system: "),
        (OSError(errno.ENOSPC, "No space left on device", "/data/o.jsonl"), 1, "o.jsonl: No space left on device: "),
    ],
    ids=["permission", "read-only-filesystem", "disk-full"],
)
def test_an_os_error_naming_a_file_is_one_line(tmp_path, monkeypatch, error, code, message):
    """The top-level handler, whoever runs the tests (root writes into read-only directories)."""
    import spo_cli.standalone

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(spo_cli.standalone, "partition_file", fail)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))
    got, err = spo_in_process("partition", str(recipe), "--in", "x.jsonl", "--out", "/data/o.jsonl")
    assert got == code, err
    assert message in error_line(err)


def test_an_unwritable_report_directory_says_to_pass_out(tmp_path, monkeypatch):
    import spo_cli.report

    def fail(groups, path, smooth=0):
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))

    monkeypatch.setattr(spo_cli.report, "plot_curves", fail)
    run = _run_dir(tmp_path / "run")
    code, err = spo_in_process("report", str(run))
    assert code == 2, err
    line = error_line(err)
    assert f"{run / 'report'}: Permission denied" in line and "pass --out" in line


# ------------------------------------------------------------------------------------ data rows of the wrong type


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_GSM8K = {"question": "1+1?", "answer": "#### 2"}


@pytest.mark.parametrize(
    ("task", "rows", "datasets", "message"),
    [
        ({"kind": "gsm8k"}, [GOOD_GSM8K, {"question": 5, "answer": "#### 2"}], "task",
         "train.jsonl: record 2: field 'question' holds int 5, expected a string"),
        ({"kind": "math", "answer_field": "answer"}, [{"problem": ["a"], "answer": "2"}], "task",
         "train.jsonl: record 1: field 'problem' holds list ['a'], expected a string"),
        ({"kind": "math"}, [{"problem": "p", "answer": {"x": 1}}], "task",
         "train.jsonl: record 1: field 'answer' holds dict {'x': 1}, expected a string or a number"),
        ({"kind": "arith"}, [GOOD_GSM8K, {"question": [1, 2], "answer": "#### 2"}], "gsm8k=FILE",
         "train.jsonl: record 2: field 'question' holds list [1, 2], expected a string"),
    ],
    ids=["gsm8k-task-int", "math-task-list", "math-answer-dict", "gsm8k-benchmark-list"],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_named_with_its_type(tmp_path, task, rows, datasets, message):
    data_file = _jsonl(tmp_path / "train.jsonl", rows)
    data = tiny_recipe_dict(tmp_path)
    if task["kind"] != "arith":
        data["task"] = {**task, "train_file": str(data_file)}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    datasets = datasets.replace("FILE", str(data_file))
    code, err = spo_in_process("eval", str(recipe), "--datasets", datasets, "--out", str(tmp_path / "e"))
    assert code == 2, err
    line = error_line(err)
    assert message in line and "has no field" not in line, line


# ------------------------------------------------------------------------------- integers past 4,300 digits


def test_math_answers_longer_than_pythons_int_limit_are_graded():
    from spo_cli.tasks.math import MathGrader, reward

    limit = sys.get_int_max_str_digits()
    gold = "1" + "2" * limit  # one digit over: Python refuses int(gold)
    head = len(gold) % 3 or 3
    grouped = ",".join([gold[:head]] + [gold[i : i + 3] for i in range(head, len(gold), 3)])  # 1,222,222,...
    responses = [f"So \\boxed{{{gold}}}.", f"\\boxed{{{grouped}}}", f"#### {gold}", f"\\boxed{{{gold[:-1]}3}}"]
    responses.append("\\boxed{7}")
    expected = [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [reward(r, gold) for r in responses] == expected  # in this process's main thread
    with MathGrader(timeout_s=1, num_workers=1) as grader:  # in a worker process
        graded = grader.grade_and_extract(responses, [gold] * len(responses))
    assert [g[0] for g in graded] == expected
    assert graded[0][2] == graded[1][2] == gold  # one canonical answer for majority voting
