"""The run directory: spo deletes, replaces and resumes only its own runs, one run holds a directory at a time, and a
start that fails early leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.recipe import parse_recipe
from spo_cli.rundir import (
    LOCK_FILE, RUN_MARKER, RunLock, check_run_dir, clear_run, holds_results, remove_failed_start, run_directory,
)  # fmt: skip

from ..conftest import REPO, tiny_recipe_dict, write_recipe


def spo(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"thesis.tex": b"\\chapter{Results}\n", "data.csv": b"a,b\n1,2\n", "metrics.jsonl": b'{"mine": 1}\n'}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def assert_untouched(folder: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, content in files.items():
        assert (folder / name).read_bytes() == content, name


def a_spo_run(run_dir: Path) -> Path:
    """A run directory as a run leaves it (marker, recipe, a result)."""
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARKER).write_text('{"spo_run": 1, "created_dir": true}\n')
    (run_dir / "recipe.resolved.yaml").write_text("run: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    return run_dir


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []])
def test_train_never_writes_into_a_directory_spo_did_not_make(tmp_path, flags):
    folder = tmp_path / "my documents"
    files = user_files(folder)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path))
    out = spo("train", str(recipe), f"run.output_dir={folder}", *flags)
    assert out.returncode == 2, out.stderr
    assert f"{folder} is not a spo run" in out.stderr and "Traceback" not in out.stderr
    assert_untouched(folder, files)


def test_overwrite_of_the_working_directory_deletes_nothing(tmp_path):
    files = user_files(tmp_path / "work")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path))
    out = spo("train", str(recipe), "run.output_dir=.", "--overwrite", cwd=tmp_path / "work")
    assert out.returncode == 2 and ". is not a spo run" in out.stderr and "Traceback" not in out.stderr
    assert_untouched(tmp_path / "work", files)


def test_overwrite_clears_a_spo_run_but_keeps_its_marker_and_lock(tmp_path):
    run_dir = a_spo_run(tmp_path / "run")
    (run_dir / "checkpoints" / "iter_000001").mkdir(parents=True)
    lock = RunLock.acquire(run_dir)
    lock.release()
    clear_run(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, RUN_MARKER]
    assert not holds_results(run_dir)


def test_a_run_of_a_spo_version_before_the_marker_is_still_a_run(tmp_path):
    """Recognised by all the files such a run has (test_user_files: never by one name alone)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_000001").mkdir(parents=True)
    (run_dir / "recipe.resolved.yaml").write_text("run: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    with pytest.raises(SpoUserError, match="already holds a run: pass --resume"):
        check_run_dir(recipe, resume=False, overwrite=False)
    assert check_run_dir(recipe, resume=True, overwrite=False) == run_dir
    assert check_run_dir(recipe, resume=False, overwrite=True) == run_dir
    with pytest.raises(SpoUserError, match="does not exist or is empty"):
        check_run_dir(parse_recipe(tiny_recipe_dict(tmp_path / "other")), resume=True, overwrite=False)


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(SpoUserError, match="is a file, not a directory"):
        check_run_dir(parse_recipe(tiny_recipe_dict(tmp_path)), resume=False, overwrite=True)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from spo_cli.rundir import RunLock
RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_live_run_directory_exits_at_once_naming_the_holder(tmp_path):
    run_dir = a_spo_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != LOCK_FILE}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path))
    holder = hold_lock(run_dir)
    try:
        for flags in (["--resume"], ["--overwrite"]):
            t0 = time.perf_counter()
            out = spo("train", str(recipe), *flags)
            assert out.returncode == 2, out.stderr
            assert f"is in use by another spo run (process {holder.pid} on " in out.stderr, out.stderr
            assert time.perf_counter() - t0 < 60  # it does not wait for the lock (or train anything)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != LOCK_FILE} == before
    # The kernel released the killed holder's lock: the leftover lock file blocks nothing.
    assert (run_dir / LOCK_FILE).exists()
    RunLock.acquire(run_dir).release()


EXEC_WITH_LOCK = """
import os, sys
from pathlib import Path
from spo_cli.rundir import RunLock
env = dict(os.environ)
RunLock.acquire(Path(sys.argv[1])).pass_to_launched(env)
code = "import os, sys, time; print(os.environ['SPO_RUN_LOCK_HELD'], flush=True); time.sleep(300)"
os.execve(sys.executable, [sys.executable, "-c", code], env)
"""


def test_the_lock_passes_to_the_launcher_that_replaces_the_process(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", EXEC_WITH_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == str(run_dir.resolve())
        with pytest.raises(SpoUserError, match=f"process {launcher.pid} on "):
            RunLock.acquire(run_dir)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    RunLock.acquire(run_dir).release()


def test_a_process_of_a_launched_run_does_not_lock_what_its_launcher_holds(tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    (tmp_path / "run").mkdir()
    lock = RunLock.acquire(tmp_path / "run")
    env = {}
    lock.pass_to_launched(env)
    with run_directory(recipe, resume=False, overwrite=False, env=env) as run_dir:
        assert (run_dir / RUN_MARKER).is_file()
    with pytest.raises(SpoUserError, match="in use by another spo run"), run_directory(recipe, False, False, env={}):
        pass
    lock.release()


def test_a_start_that_fails_before_any_result_leaves_nothing_and_can_be_rerun(tmp_path):
    data = tiny_recipe_dict(tmp_path, warm_start={"kind": "none"})
    data["model"] = {"kind": "pretrained", "name_or_path": "spo-tests/no-such-model", "dtype": "float32"}
    recipe = write_recipe(tmp_path / "r.yaml", data)
    for _ in range(2):  # the second time is not refused as "already holds a run"
        out = spo("train", str(recipe))
        assert out.returncode != 0 and "already holds a run" not in out.stderr
        assert not (tmp_path / "run").exists(), list((tmp_path / "run").iterdir())
    # A folder the user made stays, empty, as it was.
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError), run_directory(parse_recipe(tiny_recipe_dict(tmp_path)), False, False) as run_dir:
        (run_dir / "recipe.resolved.yaml").write_text("run: {}\n")
        raise RuntimeError("the hub is offline")
    assert list((tmp_path / "run").iterdir()) == []


def test_a_failed_start_keeps_a_finished_warm_start_and_a_users_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    with pytest.raises(RuntimeError), run_directory(recipe, resume=False, overwrite=False):
        (run_dir / "warm_start").mkdir()
        raise RuntimeError("failed after the warm start")
    assert (run_dir / "warm_start").is_dir() and (run_dir / RUN_MARKER).is_file()
    # A file spo did not write (here, added by the user during the start): nothing is removed.
    (run_dir / "warm_start").rmdir()
    (run_dir / "notes.txt").write_text("mine")
    remove_failed_start(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([RUN_MARKER, LOCK_FILE, "notes.txt"])


def test_a_run_holds_its_directory_until_it_ends(tmp_path):
    recipe = parse_recipe(tiny_recipe_dict(tmp_path))
    with run_directory(recipe, resume=False, overwrite=False) as run_dir:
        with pytest.raises(SpoUserError, match=r"in use by another spo run \(process \d+ on "):
            RunLock.acquire(run_dir)
        (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    RunLock.acquire(run_dir).release()  # released at the end of the run


def test_a_deepspeed_checkpoint_resumed_in_another_world_size_is_refused_inside_the_run(tmp_path):
    """The launcher refuses a mismatched `hardware.num_processes` before launching; a run started some other way
    (e.g. `accelerate launch` by hand) meets the same refusal when it reads the checkpoint."""
    from types import SimpleNamespace

    from spo_cli.distributed import Cluster
    from spo_cli.rundir import check_resume_world as _check_resume_world

    ckpt = tmp_path / "checkpoints" / "iter_000002"
    under_deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()))
    with pytest.raises(SpoUserError) as refused:
        _check_resume_world({"world_size": 2}, ckpt, Cluster(world_size=3), under_deepspeed)
    assert "shards of 2 DeepSpeed processes and this run has 3" in str(refused.value)
    assert "hardware.num_processes=2" in str(refused.value) and str(ckpt / "model") in str(refused.value)
    _check_resume_world({"world_size": 2}, ckpt, Cluster(world_size=2), under_deepspeed)  # same size: resumes
    without = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))  # DDP state loads in any world size
    _check_resume_world({"world_size": 2}, ckpt, Cluster(world_size=1), without)
