"""The run directory: which directories spo may write, replace or resume, and the lock that gives one run at a time.

What spo promises (README, "Reliability"):
- It writes a run only into a missing or empty directory, or into one it recognises as its own run: a directory
  holding the marker file `.spo-run` that spo writes when it starts a run there (or, from spo versions before the
  marker, a `recipe.resolved.yaml`). `--overwrite` and `--resume` refuse any other directory, so spo never deletes
  or replaces files it did not write.
- One run at a time: a run holds an exclusive lock on `<run_dir>/.spo-lock` (`flock`, which the operating system
  releases when the process ends, however it ends), so a second `spo train` on the same directory exits at once
  with code 2 naming the holder, and a killed run never blocks `--resume`. All processes of a distributed run are
  one owner: the launching process holds the lock for the launched ones, or the main process holds it when a
  launcher started the processes by hand.
- A run that fails before it wrote anything worth keeping (a checkpoint, a warm start, metrics) removes what it
  created, so the same command can simply be run again.

Imports neither torch nor transformers: the CLI checks a run directory before it starts any heavy work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from spo_cli.distributed import LOCAL, Cluster
from spo_cli.errors import SpoUserError
from spo_cli.recipe import Recipe

RUN_MARKER = ".spo-run"
LOCK_FILE = ".spo-lock"
RESOLVED_RECIPE = "recipe.resolved.yaml"
# Set by the process that holds a run's lock for the processes it launches (its value: the locked directory).
LOCK_HELD_ENV = "SPO_RUN_LOCK_HELD"
# What a run writes before its first result: a directory holding only these has nothing to resume or lose.
_BOOKKEEPING = frozenset({RUN_MARKER, LOCK_FILE, RESOLVED_RECIPE})


def is_spo_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a run spo started (its marker), or one started by a spo version before the marker."""
    return (run_dir / RUN_MARKER).is_file() or (run_dir / RESOLVED_RECIPE).is_file()


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything besides the bookkeeping a run writes before its first result (and the
    half-written staging copies a kill can leave, which are never read)."""
    return run_dir.is_dir() and any(not _is_bookkeeping(entry.name) for entry in run_dir.iterdir())


def _is_bookkeeping(name: str) -> bool:
    return name in _BOOKKEEPING or (name.startswith(".") and (name.endswith(".partial") or ".tmp-" in name))


def check_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    """The run directory, if the flags allow using it: never write into a directory spo did not make, never clobber
    an old run by accident, and never resume a DeepSpeed checkpoint with another number of processes. Changes
    nothing on disk."""
    run_dir = recipe.run.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise SpoUserError(f"run directory {run_dir} is a file, not a directory: set run.output_dir to a directory")
    if holds_results(run_dir) and not is_spo_run(run_dir):
        raise SpoUserError(
            f"{run_dir} is not a spo run (it has no {RUN_MARKER}) and is not empty: spo writes, resumes and "
            "overwrites only its own run directories; set run.output_dir to a new or empty folder"
        )
    if resume:
        if not holds_results(run_dir):
            raise SpoUserError(f"--resume: run directory {run_dir} does not exist or is empty; start without --resume")
        _check_resume_world(recipe, run_dir)
    elif holds_results(run_dir) and not overwrite:
        raise SpoUserError(
            f"run directory {run_dir} already holds a run: pass --resume to continue it, --overwrite to "
            "replace it, or set run.output_dir to a new folder"
        )
    return run_dir


def _check_resume_world(recipe: Recipe, run_dir: Path) -> None:
    from spo_cli.checkpoint import latest_checkpoint, read_trainer_state

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "deepspeed").is_dir():
        return
    saved = int(read_trainer_state(ckpt).get("world_size", 1))
    asked = recipe.hardware.num_processes
    if asked is not None and asked != saved:
        raise SpoUserError(world_mismatch(ckpt, saved, asked))


def check_resume_world(state: dict, ckpt: Path, cluster: Cluster, accelerator) -> None:
    """Inside a run: DeepSpeed's optimizer shards load only into the number of processes that wrote them (the
    launcher checks `hardware.num_processes` before it starts; a run started some other way meets this)."""
    saved = int(state.get("world_size", 1))
    if accelerator is not None and accelerator.state.deepspeed_plugin is not None and saved != cluster.world_size:
        raise SpoUserError(world_mismatch(ckpt, saved, cluster.world_size))


def world_mismatch(ckpt: Path, saved: int, asked: int) -> str:
    """Why a DeepSpeed checkpoint cannot resume in another number of processes, and what to do instead."""
    return (
        f"--resume: {ckpt} holds the optimizer shards of {saved} DeepSpeed processes and this run has {asked}; "
        f"resume with hardware.num_processes={saved} (or start a new run from {ckpt / 'model'})"
    )


def check_not_locked(run_dir: Path, env: Mapping[str, str] = os.environ) -> None:
    """Refuse at once, before any heavy work, a run directory that a live run holds (the run still takes the lock
    itself: this only moves the common refusal to the start)."""
    if (run_dir / LOCK_FILE).is_file() and not lock_held_by_launcher(run_dir, env):
        RunLock.acquire(run_dir).release()


class RunLock:
    """An exclusive `flock` on `<run_dir>/.spo-lock`, held until `release()` or the end of the process.

    The lock file itself is never the lock's state (a killed run leaves it behind, unlocked); it records who holds
    the lock so that a refused second run can say which process to look at.
    """

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (which must exist) or raise SpoUserError naming the process that holds it."""
        import fcntl

        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise SpoUserError(f"{run_dir} is in use by another spo run ({_holder(path)})") from None
                raise
            # The file may have been removed (a failed start cleaning up) between our open and our lock: then the
            # lock is on a file nobody else will look at, so lock the current one instead.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return cls(fd, path)

    def pass_to_launched(self, env: dict[str, str]) -> None:
        """Keep the lock across exec into a launcher: the launcher process holds it while its processes run."""
        os.set_inheritable(self.fd, True)
        env[LOCK_HELD_ENV] = str(self.path.parent.resolve())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = -1


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"process {info['pid']} on {info['host']}: {' '.join(map(str, info.get('command', [])))}".strip()
    except (OSError, ValueError, KeyError, TypeError):
        return f"see {lock_path}"


def lock_held_by_launcher(run_dir: Path, env: Mapping[str, str]) -> bool:
    """Whether the process that launched this one holds `run_dir`'s lock for it."""
    return env.get(LOCK_HELD_ENV) == str(run_dir.resolve())


def create_run_dir(run_dir: Path) -> bool:
    """Make `run_dir` (and its parents); True when this call created it."""
    existed = run_dir.is_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    return not existed


def write_marker(run_dir: Path, created_dir: bool) -> None:
    """Mark `run_dir` as a spo run; remembers whether spo created the directory (then a failed start removes it)."""
    from spo_cli.fsutil import atomic_write_json

    marker = run_dir / RUN_MARKER
    if marker.is_file():
        return
    atomic_write_json(marker, {"spo_run": 1, "created_dir": created_dir, "created": time.time()})


def clear_run(run_dir: Path) -> None:
    """Delete a recognised run's files for --overwrite, keeping the directory, its lock and its marker (so a crash
    halfway still leaves a directory spo recognises)."""
    if not is_spo_run(run_dir):
        raise SpoUserError(f"--overwrite: {run_dir} is not a spo run; refusing to delete its files")
    for entry in run_dir.iterdir():
        if entry.name in (RUN_MARKER, LOCK_FILE):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_failed_start(run_dir: Path) -> None:
    """Remove what a start that failed before any result created: the bookkeeping files, and the directory itself
    when spo created it (never a user's files: a directory with anything else in it is left as it is)."""
    if not run_dir.is_dir() or holds_results(run_dir):
        return
    created_dir = False
    with contextlib.suppress(OSError, ValueError):
        created_dir = bool(json.loads((run_dir / RUN_MARKER).read_text()).get("created_dir"))
    for entry in sorted(run_dir.iterdir(), key=lambda e: e.name == LOCK_FILE):  # the lock file last
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    if created_dir:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty: a file that appeared meanwhile stays


@contextlib.contextmanager
def run_directory(
    recipe: Recipe, resume: bool, overwrite: bool, cluster: Cluster = LOCAL, env: Mapping[str, str] = os.environ
) -> Iterator[Path]:
    """The run directory, checked, created, locked and marked for the duration of the block (cleared first for
    --overwrite). A block that fails before the run wrote a result removes what the start created.

    Every process checks the flags; the main one changes the directory and takes the lock (unless the launcher
    holds it) and tells the others whether that worked, so all of them fail alike.
    """
    run_dir = check_run_dir(recipe, resume, overwrite)
    lock, failure = None, None
    if cluster.is_main:
        try:
            lock = claim_run_dir(recipe, resume, overwrite, env)
        except Exception as exc:
            failure = exc
    problem = cluster.broadcast(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if problem is not None:
        raise SpoUserError(f"the main process could not start the run: {problem}")
    try:
        yield run_dir
    except BaseException:
        if cluster.is_main and not resume:
            remove_failed_start(run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def claim_run_dir(recipe: Recipe, resume: bool, overwrite: bool, env: Mapping[str, str]) -> RunLock | None:
    """Create, lock and mark the run directory (clearing it for --overwrite); the lock, or None where the launcher
    of this process holds it."""
    run_dir = recipe.run.run_dir
    created = create_run_dir(run_dir)
    lock = None if lock_held_by_launcher(run_dir, env) else RunLock.acquire(run_dir)
    try:
        # Checked again under the lock: another run may have written here since the first check.
        check_run_dir(recipe, resume, overwrite)
        if overwrite and not resume and holds_results(run_dir):
            clear_run(run_dir)
        write_marker(run_dir, created)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
