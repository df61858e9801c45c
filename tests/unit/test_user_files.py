"""User files are sacred: `spo train --overwrite` deletes only what spo wrote in a run directory (its manifest), and
`spo eval --out` writes only into a new or empty directory or one it marked as its own, one eval at a time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.recipe import parse_recipe
from spo_cli.rundir import LOCK_FILE, RUN_MARKER, check_run_dir, run_directory

from ..conftest import REPO, spo_in_process, tiny_recipe_dict, write_recipe

FAST_TRAIN = {
    "warm_start": {"kind": "sft", "steps": 2, "batch_size": 4, "log_every": 10},
    "train": {"iterations": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "ppo_epochs": 1,
              "save_steps": 1, "save_total_limit": 2},
}  # fmt: skip


def spo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (symlinks not followed): file contents, link targets, directories."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = path.read_bytes()
    return found


def a_run(run_dir: Path) -> Path:
    """A run directory as spo leaves it (its marker as spo versions before the manifest wrote it)."""
    (run_dir / "checkpoints" / "iter_000001" / "model").mkdir(parents=True)
    (run_dir / RUN_MARKER).write_text('{"spo_run": 1, "created_dir": true}\n')
    (run_dir / "recipe.resolved.yaml").write_text("run: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (run_dir / "checkpoints" / "iter_000001" / "trainer_state.json").write_text('{"iteration": 1}\n')
    (run_dir / "checkpoints" / "latest").write_text("iter_000001\n")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1.host.2.0").write_bytes(b"\0")
    return run_dir


def users_things(run_dir: Path) -> None:
    (run_dir / "MY_NOTES.txt").write_text("what I tried\n")
    (run_dir / "paper.md").write_text("# Results\n")
    nested = run_dir / "ablation"  # another run the user keeps inside this one
    nested.mkdir()
    (nested / RUN_MARKER).write_text('{"spo_run": 1}\n')
    (nested / "metrics.jsonl").write_text('{"iteration": 1}\n')


def recipe_file(tmp_path: Path, output_dir: Path | None = None, **sections) -> Path:
    data = tiny_recipe_dict(tmp_path, **sections)
    if output_dir is not None:
        data["run"]["output_dir"] = str(output_dir)
    return write_recipe(tmp_path / "r.yaml", data)


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []])
def test_a_users_folder_holding_a_recipe_resolved_yaml_is_not_a_run(tmp_path, flags):
    folder = tmp_path / "results"
    (folder / "figures").mkdir(parents=True)
    (folder / "recipe.resolved.yaml").write_text("run: {name: the one in the paper}\n")
    (folder / "results.csv").write_text("method,accuracy\nspo,0.61\n")
    (folder / "figures" / "curves.png").write_bytes(b"\x89PNG mine")
    before = snapshot(folder)
    out = spo("train", str(recipe_file(tmp_path, folder)), *flags)
    assert out.returncode == 2, out.stderr
    assert f"{folder} is not a spo run" in out.stderr and "Traceback" not in out.stderr
    assert snapshot(folder) == before


@pytest.mark.parametrize("through_a_symlink", [False, True])
def test_overwrite_refuses_a_run_holding_files_spo_did_not_write_and_names_them(tmp_path, through_a_symlink):
    run_dir = a_run(tmp_path / "run")
    users_things(run_dir)
    before = snapshot(run_dir)
    named = run_dir
    if through_a_symlink:
        named = tmp_path / "latest-run"
        named.symlink_to(run_dir)
    out = spo("train", str(recipe_file(tmp_path, named)), "--overwrite")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "--overwrite-foreign-files" in out.stderr
    for name in ("MY_NOTES.txt", "paper.md", "ablation"):
        assert name in out.stderr, out.stderr
    assert snapshot(run_dir) == before
    assert named.is_dir()


def test_a_users_file_inside_a_directory_spo_made_is_refused(tmp_path):
    run_dir = a_run(tmp_path / "run")
    (run_dir / "checkpoints" / "which-one-is-best.txt").write_text("iter 1\n")
    (run_dir / "tensorboard" / "notes.md").write_text("the dip at step 3\n")
    before = snapshot(run_dir)
    with pytest.raises(SpoUserError) as refused:
        check_run_dir(parse_recipe(tiny_recipe_dict(tmp_path)), resume=False, overwrite=True)
    assert "checkpoints/which-one-is-best.txt" in str(refused.value)
    assert "tensorboard/notes.md" in str(refused.value)
    assert snapshot(run_dir) == before


def test_the_refusal_names_ten_files_and_counts_the_rest(tmp_path):
    run_dir = a_run(tmp_path / "run")
    for i in range(14):
        (run_dir / f"figure_{i:02d}.pdf").write_bytes(b"%PDF")
    with pytest.raises(SpoUserError) as refused:
        check_run_dir(parse_recipe(tiny_recipe_dict(tmp_path)), resume=False, overwrite=True)
    message = str(refused.value)
    assert "\n" not in message
    assert len(re.findall(r"figure_\d\d\.pdf", message)) == 10 and "and 4 more" in message


def test_a_run_records_what_it_writes_and_a_name_it_did_not_record_is_the_users(tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    with run_directory(recipe, resume=False, overwrite=False) as run_dir:
        (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    manifest = json.loads((run_dir / RUN_MARKER).read_text())
    for name in ("recipe.resolved.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "episodes", "warm_start"):
        assert name in manifest["entries"], name
    # A run whose manifest does not record `episodes` (the user made it before spo reserved the name): the user's.
    manifest["entries"] = [n for n in manifest["entries"] if n != "episodes"]
    (run_dir / RUN_MARKER).write_text(json.dumps(manifest))
    (run_dir / "episodes").mkdir()
    (run_dir / "episodes" / "iter_000001.jsonl").write_text("{}\n")
    with pytest.raises(SpoUserError, match="episodes"):
        check_run_dir(recipe, resume=False, overwrite=True)


def test_overwrite_foreign_files_deletes_them_too_but_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.csv").write_text("a,b\n")
    run_dir = a_run(tmp_path / "real-run")
    users_things(run_dir)
    (run_dir / "data").symlink_to(outside)
    (run_dir / "checkpoints" / "iter_000001" / "model" / "shared").symlink_to(outside)
    (tmp_path / "run").symlink_to(run_dir)  # the recipe's run directory is a symlink to the real one
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    with pytest.raises(SpoUserError, match="--overwrite-foreign-files"):
        check_run_dir(recipe, resume=False, overwrite=True)
    with run_directory(recipe, resume=False, overwrite=True, overwrite_foreign=True):
        pass
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, RUN_MARKER]
    assert (tmp_path / "run").is_symlink() and snapshot(outside) == {"data.csv": b"a,b\n"}


def test_overwrite_foreign_files_goes_with_overwrite(tmp_path):
    run_dir = a_run(tmp_path / "run")
    before = snapshot(run_dir)
    out = spo("train", str(recipe_file(tmp_path)), "--overwrite-foreign-files")
    assert out.returncode == 2 and "--overwrite-foreign-files goes with --overwrite" in out.stderr, out.stderr
    assert snapshot(run_dir) == before


def test_a_run_from_before_the_marker_is_recognised_by_all_of_its_files_and_keeps_the_users(tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    run_dir = a_run(tmp_path / "run")
    (run_dir / RUN_MARKER).unlink()
    assert check_run_dir(recipe, resume=True, overwrite=False) == run_dir
    (run_dir / "MY_NOTES.txt").write_text("mine\n")
    with pytest.raises(SpoUserError, match="MY_NOTES.txt"):
        check_run_dir(recipe, resume=False, overwrite=True)
    (run_dir / "MY_NOTES.txt").unlink()
    with run_directory(recipe, resume=False, overwrite=True):
        pass
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, RUN_MARKER]
    # One or two of a run's names are not a run: without checkpoints there is nothing spo would resume.
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "recipe.resolved.yaml").write_text("run: {}\n")
    (folder / "metrics.jsonl").write_text('{"iteration": 1}\n')
    mine = parse_recipe(tiny_recipe_dict(tmp_path / "x") | {"run": {"output_dir": str(folder)}})
    with pytest.raises(SpoUserError, match="is not a spo run"):
        check_run_dir(mine, resume=False, overwrite=True)


def help_text(command: str) -> str:
    return " ".join(spo(command, "--help").stdout.replace("│", " ").split())  # unwrapped, without rich's box


def test_the_help_names_the_flags_and_what_they_delete():
    train_help = help_text("train")
    assert "--overwrite-foreign-files" in train_help and "delete the files spo did not write" in train_help
    assert "Refuses, naming them, when the run directory holds files spo did not write" in train_help
    assert "deletes and rewrites only the files spo eval wrote" in help_text("eval")


# ------------------------------------------------------------------------------------------ spo eval --out


def eval_args(tmp_path: Path, out: Path) -> list[str]:
    return ["eval", str(recipe_file(tmp_path)), "--max-problems", "1", "--out", str(out)]


def test_eval_refuses_an_out_holding_a_users_results_and_names_them(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}\n')
    (out / "table.md").write_text("| my table |\n")
    before = snapshot(out)
    code, err = spo_in_process(*eval_args(tmp_path, out))
    assert code == 2, err
    assert "results.json" in err and "table.md" in err and "Traceback" not in err
    assert snapshot(out) == before


HOLD_LOCK = """
import sys, time
from pathlib import Path
from spo_cli.rundir import RunLock
RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_eval_on_the_same_out_exits_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = spo_in_process(*eval_args(tmp_path, out))
        assert code == 2, err
        assert f"in use by another spo" in err and f"process {holder.pid} on " in err, err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_eval_marks_its_output_resumes_it_and_refuses_a_file_added_later(tmp_path):
    out = tmp_path / "e"
    args = eval_args(tmp_path, out)
    assert spo_in_process(*args)[0] == 0
    assert (out / ".spo-eval").is_file()
    done = snapshot(out)
    assert spo_in_process(*args)[0] == 0  # finished: read back
    assert {k: v for k, v in snapshot(out).items() if k != LOCK_FILE} == {k: v for k, v in done.items() if k != LOCK_FILE}
    units = [p for p in out.rglob("*.settings.json")]
    (units[0].parent / "my-comparison.md").write_text("mine\n")
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):
        code, err = spo_in_process(*args, *flags)
        assert code == 2, err
        assert "notes.txt" in err and "my-comparison.md" in err, err
    assert snapshot(out) == before


def test_eval_adopts_an_output_written_before_its_marker(tmp_path):
    out = tmp_path / "e"
    args = eval_args(tmp_path, out)
    assert spo_in_process(*args)[0] == 0
    (out / ".spo-eval").unlink()
    (out / LOCK_FILE).unlink()
    code, err = spo_in_process(*args)
    assert code == 0, err
    assert (out / ".spo-eval").is_file()


# ------------------------------------------------------------------------------------------ a real run


def test_overwrite_of_a_real_run_deletes_exactly_what_spo_wrote_there(tmp_path):
    """Everything a run, `spo eval` and `spo report` write into a run directory is spo's; a user's file is not."""
    from spo_cli.rundir import clear_run, foreign_entries

    recipe = recipe_file(tmp_path, **FAST_TRAIN)
    code, err = spo_in_process("train", str(recipe))
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert spo_in_process("eval", str(recipe), "--max-problems", "1")[0] == 0  # into <run_dir>/eval
    assert spo_in_process("report", str(run_dir), "--episodes", "1")[0] == 0  # into <run_dir>/report
    assert {"eval", "report", "warm_start", "checkpoints", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    (run_dir / "eval" / "notes.txt").write_text("mine\n")
    before = snapshot(run_dir)
    code, err = spo_in_process("train", str(recipe), "--overwrite")
    assert code == 2 and "eval/notes.txt" in err, err
    assert snapshot(run_dir) == before
    assert foreign_entries(run_dir) == ["eval/notes.txt"]
    # With the flag the user's files go too, and a symlink goes without what it points to.
    (tmp_path / "precious").mkdir()
    (run_dir / "data").symlink_to(tmp_path / "precious")
    code, err = spo_in_process("train", str(recipe), "--overwrite", "--overwrite-foreign-files")
    assert code == 0, err
    assert not (run_dir / "eval").exists() and not (run_dir / "data").exists() and (tmp_path / "precious").is_dir()
    assert foreign_entries(run_dir) == []
    clear_run(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, RUN_MARKER]


def test_every_name_a_run_writes_into_its_directory_is_one_it_records():
    """A guard for new code: each `run_dir / NAME` in spo_cli is a name the run directory's manifest records."""
    from spo_cli.rundir import RUN_ENTRIES, is_run_entry

    sources = list((REPO / "spo_cli").rglob("*.py"))
    constants = {}
    for path in sources:
        constants.update(re.findall(r'^([A-Z_]+)\s*=\s*"([^"]*)"', path.read_text(), re.M))
    samples = {"tag": "iter_000001", "WARM_START_DIR": constants["WARM_START_DIR"]}
    seen = set()
    for path in sources:
        for literal, constant in re.findall(r'run_dir\s*/\s*(?:(f?"[^"]*")|([A-Z_]+)\b)', path.read_text()):
            if constant:
                name = constants[constant]
            else:
                name = re.sub(r"\{(\w+)\}", lambda m: samples[m.group(1)], literal.lstrip("f").strip('"'))
            seen.add(name)
            assert is_run_entry(name), f"{path.name}: {name} is not in rundir.RUN_ENTRIES"
    assert {"metrics.jsonl", "checkpoints", "trees", "offline_values.json", "wandb_run_id"} <= seen
    assert RUN_ENTRIES
