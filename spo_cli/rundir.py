"""The run directory: which directories spo may write, replace or resume, what `--overwrite` deletes there, and the
lock that gives one run at a time; and the same for `spo eval`'s output directory.

What spo promises (README, "A run directory"):
- It writes a run only into a missing or empty directory, or into one it recognises as its own run: a directory
  holding the marker `.spo-run` that spo writes when it starts a run there, or, from spo versions before the marker,
  one holding all of `recipe.resolved.yaml`, `metrics.jsonl` and a checkpoint `checkpoints/iter_NNNNNN/` (what
  every such run with anything to resume has; never one name alone). Any other directory that is not empty is
  refused by `--overwrite`, `--resume` and a plain start alike.
- The marker is the run's manifest: the top-level names (globs) of what spo writes in the run directory
  (`RUN_ENTRIES`: the run's files, `spo eval`'s default `eval/` and `spo report`'s default `report/`), recorded
  atomically when the run claims the directory, before any of them is made. A name is recorded only while nothing
  of that name is there, so a file the user made before spo reserved its name stays the user's. A run without a
  manifest (before the marker, or before the marker held one) counts every name of `RUN_ENTRIES` as spo's.
- `--overwrite` deletes exactly the recorded entries and keeps the marker and the lock. Inside a directory spo
  made it expects only what spo writes there (`RUN_ENTRIES`' inner globs; `eval/` by its own manifest); a
  checkpoint `iter_NNNNNN/`, the warm start and W&B's `wandb/` are each written by spo as a whole and deleted as a
  whole. When anything else is in the run directory, `--overwrite` deletes nothing and exits 2 naming it, unless
  `--overwrite-foreign-files` is given too: then every entry but the marker and the lock goes. Deleting never
  follows a symlink: a symlink in the run directory is unlinked, and a symlinked run directory is cleared inside
  its target.
- `spo eval --out D` writes only into a missing or empty D or one it marked as its own (`.spo-eval`, which records
  the checkpoint folders it made; an output of spo versions before that marker is recognised by its layout); it
  refuses, naming them, a D holding files it did not write, and takes D's lock like a run.
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
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from spo_cli.distributed import LOCAL, Cluster
from spo_cli.errors import SpoUserError
from spo_cli.recipe import Recipe

RUN_MARKER = ".spo-run"
LOCK_FILE = ".spo-lock"
RESOLVED_RECIPE = "recipe.resolved.yaml"
EVAL_MARKER = ".spo-eval"
EVAL_DIR = "eval"  # `spo eval`'s default output in a run directory: what is spo's there, its own manifest says
# Set by the process that holds a run's lock for the processes it launches (its value: the locked directory).
LOCK_HELD_ENV = "SPO_RUN_LOCK_HELD"
FOREIGN_FLAG = "--overwrite-foreign-files"
# The staging copy fsutil.atomic_open writes beside a file (`.NAME.tmp-PID`): a kill can leave one in any directory.
_STAGING = (".*.tmp-[0-9]*",)

# Every top-level name (a glob) that spo writes into a run directory, and where it is written; for a directory whose
# entries spo writes one by one, the globs of those entries (None: a file, or a directory spo writes as a whole).
RUN_ENTRIES: dict[str, tuple[str, ...] | None] = {
    RUN_MARKER: None,
    LOCK_FILE: None,
    RESOLVED_RECIPE: None,  # train._save_resolved_recipe
    "metrics.jsonl": None,  # metrics.MetricsLog
    "tensorboard": ("events.out.tfevents.*",),  # metrics.TensorBoardSink
    "wandb_run_id": None,  # metrics.WandbSink
    "wandb": None,  # W&B's own files (wandb.init(dir=run_dir))
    "warm_start": None,  # policy_loading: a model directory, published whole (fsutil.publish_dir)
    ".warm_start.partial": None,  # ... staged here
    "warm_start.old": None,  # ... and the one it replaces, for a moment
    "checkpoints": ("iter_[0-9]*", ".iter_[0-9]*.partial", "iter_[0-9]*.old", "latest"),  # checkpoint.py; each whole
    "episodes": ("iter_[0-9]*.jsonl",),  # train._save_iteration_logs (logging.save_episodes)
    "trees": ("iter_[0-9]*.jsonl",),  # estimate/tree (logging.save_episodes)
    "completions.jsonl": None,  # train._log_completions
    "eval_before.json": None,  # train._evaluator
    "eval_after.json": None,
    "eval_iter_[0-9]*.json": None,
    "summary.json": None,  # train.train
    "offline_values.json": None,  # estimate/single_stream: offline values estimated by the run
    "offline_values.json.shards": ("shard_[0-9]*.json", "manifest.json"),
    EVAL_DIR: None,  # `spo eval`'s default --out
    "report": ("report.html", "curves.png", "credit.png", ".curves.png.tmp", ".credit.png.tmp"),  # `spo report`'s
    _STAGING[0]: None,
}
# A run of a spo version before the marker has all of these (a checkpoint: else it has nothing to resume).
_CHECKPOINT_NAME = re.compile(r"^iter_\d{6}$")


def is_run_entry(name: str) -> bool:
    """Whether `name` is a top-level name spo writes in a run directory."""
    return _matching(name, RUN_ENTRIES) is not None


def _matching(name: str, globs: Iterable[str]) -> str | None:
    return next((glob for glob in globs if fnmatchcase(name, glob)), None)


def is_spo_run(run_dir: Path) -> bool:
    """Whether `run_dir` is a run spo started (its marker), or one started by a spo version before the marker."""
    return (run_dir / RUN_MARKER).is_file() or is_run_before_marker(run_dir)


def is_run_before_marker(run_dir: Path) -> bool:
    """Whether `run_dir` holds everything a run of a spo version before the marker has: its resolved recipe, its
    metrics and a checkpoint. A folder where the user keeps a copy of one or two of those names is not a run."""
    checkpoints = run_dir / "checkpoints"
    return (
        (run_dir / RESOLVED_RECIPE).is_file()
        and (run_dir / "metrics.jsonl").is_file()
        and checkpoints.is_dir()
        and any(_CHECKPOINT_NAME.match(p.name) and p.is_dir() for p in checkpoints.iterdir())
    )


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything besides the bookkeeping a run writes before its first result (and the
    half-written staging copies a kill can leave, which are never read)."""
    if not run_dir.is_dir():
        return False
    marked = (run_dir / RUN_MARKER).is_file()
    return any(not _is_bookkeeping(entry.name, marked) for entry in run_dir.iterdir())


def _is_bookkeeping(name: str, marked: bool) -> bool:
    # Without the marker, nothing but the lock and the marker's own staging copy (a kill while it was written) is
    # spo's: a `recipe.resolved.yaml` there is the user's copy.
    if name in (RUN_MARKER, LOCK_FILE) or fnmatchcase(name, f".{RUN_MARKER}.tmp-[0-9]*"):
        return True
    return marked and (name in (RESOLVED_RECIPE, ".warm_start.partial") or _matching(name, _STAGING) is not None)


def recorded_entries(run_dir: Path) -> list[str]:
    """The top-level names (globs) that the run's manifest records as spo's; every name of RUN_ENTRIES for a run
    without a manifest (one from before the marker, or before the marker held the manifest)."""
    entries = _read_json_object(run_dir / RUN_MARKER).get("entries")
    if isinstance(entries, list) and all(isinstance(e, str) for e in entries):
        return entries
    return list(RUN_ENTRIES)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of the run directory that spo did not write, as paths relative to it: a top-level entry its
    manifest does not record, or, inside a directory spo made, an entry that is not what spo writes there. Never
    looks through a symlink."""
    recorded = recorded_entries(run_dir)
    foreign: list[str] = []
    for entry in sorted(run_dir.iterdir()):
        glob = _matching(entry.name, recorded)
        if glob is None:
            foreign.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{name}" for name in _foreign_inside(entry, RUN_ENTRIES.get(glob))]
    return foreign


def _foreign_inside(folder: Path, inner: tuple[str, ...] | None) -> list[str]:
    if folder.name == EVAL_DIR:
        return eval_foreign_entries(folder)
    if inner is None:  # written whole by spo (a model directory, W&B's files)
        return []
    return [p.name for p in sorted(folder.iterdir()) if _matching(p.name, (*inner, *_STAGING)) is None]


def some_names(names: list[str], limit: int = 10) -> str:
    """`names` for a one-line message: the first `limit`, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refuse_foreign(run_dir: Path) -> None:
    foreign = foreign_entries(run_dir)
    if foreign:
        raise SpoUserError(
            f"--overwrite: {run_dir} holds files spo did not write: {some_names(foreign)}; move them out of the run "
            f"directory, or add {FOREIGN_FLAG} to delete them too"
        )


def check_run_dir(recipe: Recipe, resume: bool, overwrite: bool, overwrite_foreign: bool = False) -> Path:
    """The run directory, if the flags allow using it: never write into a directory spo did not make, never clobber
    an old run by accident, never let --overwrite delete a file spo did not write (unless `overwrite_foreign`), and
    never resume a DeepSpeed checkpoint with another number of processes. Changes nothing on disk."""
    run_dir = recipe.run.run_dir
    if overwrite_foreign and not overwrite:
        raise SpoUserError(f"{FOREIGN_FLAG} goes with --overwrite: it lets --overwrite delete files spo did not write")
    if run_dir.exists() and not run_dir.is_dir():
        raise SpoUserError(f"run directory {run_dir} is a file, not a directory: set run.output_dir to a directory")
    if holds_results(run_dir) and not is_spo_run(run_dir):
        raise SpoUserError(
            f"{run_dir} is not a spo run (it has no {RUN_MARKER}, nor the {RESOLVED_RECIPE}, metrics.jsonl and "
            "checkpoints/ of a run from before the marker) and is not empty: spo writes, resumes and overwrites only "
            "its own run directories; set run.output_dir to a new or empty folder"
        )
    if resume:
        if not holds_results(run_dir):
            raise SpoUserError(f"--resume: run directory {run_dir} does not exist or is empty; start without --resume")
        _check_resume_world(recipe, run_dir)
    elif holds_results(run_dir):
        if not overwrite:
            raise SpoUserError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, --overwrite to "
                "replace it, or set run.output_dir to a new folder"
            )
        if not overwrite_foreign:
            _refuse_foreign(run_dir)
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
    def acquire(cls, run_dir: Path, user: str = "spo run") -> RunLock:
        """Lock `run_dir` (which must exist) or raise SpoUserError naming the process that holds it (another
        `user`: what holds such a directory)."""
        import fcntl

        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise SpoUserError(f"{run_dir} is in use by another {user} ({_holder(path)})") from None
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
    """Mark `run_dir` as a spo run and record in its manifest, atomically and before the run writes any of them, the
    names it writes (RUN_ENTRIES); a name is added only while nothing of that name is there, so what the user made
    first stays theirs. Remembers whether spo created the directory (then a failed start removes it)."""
    from spo_cli.fsutil import atomic_write_json

    marker = run_dir / RUN_MARKER
    old = _read_json_object(marker) if marker.is_file() else {}
    entries = recorded_entries(run_dir)  # a new run, or one without a manifest: every name a run writes
    present = [entry.name for entry in run_dir.iterdir()]
    added = [glob for glob in RUN_ENTRIES if glob not in entries and not any(fnmatchcase(n, glob) for n in present)]
    if old.get("entries") == entries and not added:
        return
    manifest = {
        "spo_run": 2,
        "created_dir": bool(old.get("created_dir", created_dir)),
        "created": old.get("created", time.time()),
        "entries": entries + added,
    }
    atomic_write_json(marker, manifest)


def clear_run(run_dir: Path, foreign: bool = False) -> None:
    """Delete a recognised run's files for --overwrite: the entries its manifest records, keeping the directory, its
    lock and its marker (so a crash halfway still leaves a directory spo recognises). Deletes nothing and raises
    SpoUserError naming them when the directory holds files spo did not write, unless `foreign`: then those go too.
    A symlink is unlinked, never followed; a symlinked run directory is cleared inside its target."""
    if not is_spo_run(run_dir):
        raise SpoUserError(f"--overwrite: {run_dir} is not a spo run; refusing to delete its files")
    root = run_dir.resolve()
    if not foreign:
        _refuse_foreign(root)
    recorded = recorded_entries(root)
    doomed = [
        entry for entry in sorted(root.iterdir())
        if entry.name not in (RUN_MARKER, LOCK_FILE) and (foreign or _matching(entry.name, recorded))
    ]  # fmt: skip
    # An eval output goes only while no `spo eval` writes there; all are checked before anything is deleted.
    guards: list[RunLock] = []
    try:
        for entry in doomed:
            if entry.is_dir() and not entry.is_symlink() and (entry / EVAL_MARKER).is_file():
                guards.append(RunLock.acquire(entry, "spo eval"))
        for entry in doomed:
            _delete(entry)
    finally:
        for guard in guards:
            guard.release()


def _delete(entry: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree (whose symlinks are unlinked)."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry)  # Python's fd-based rmtree: a symlink inside is removed, never followed


def remove_failed_start(run_dir: Path) -> None:
    """Remove what a start that failed before any result created: the bookkeeping files, and the directory itself
    when spo created it (never a user's files: a directory with anything else in it is left as it is)."""
    if not run_dir.is_dir() or holds_results(run_dir):
        return
    created_dir = bool(_read_json_object(run_dir / RUN_MARKER).get("created_dir"))
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
    recipe: Recipe,
    resume: bool,
    overwrite: bool,
    cluster: Cluster = LOCAL,
    env: Mapping[str, str] = os.environ,
    overwrite_foreign: bool = False,
) -> Iterator[Path]:
    """The run directory, checked, created, locked and marked for the duration of the block (cleared first for
    --overwrite: what spo wrote there, and with `overwrite_foreign` the rest too). A block that fails before the run
    wrote a result removes what the start created.

    Every process checks the flags; the main one changes the directory and takes the lock (unless the launcher
    holds it) and tells the others whether that worked, so all of them fail alike.
    """
    run_dir = check_run_dir(recipe, resume, overwrite, overwrite_foreign)
    lock, failure = None, None
    if cluster.is_main:
        try:
            lock = claim_run_dir(recipe, resume, overwrite, env, overwrite_foreign)
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


def claim_run_dir(
    recipe: Recipe, resume: bool, overwrite: bool, env: Mapping[str, str], overwrite_foreign: bool = False
) -> RunLock | None:
    """Create, lock and mark the run directory (clearing it for --overwrite); the lock, or None where the launcher
    of this process holds it."""
    run_dir = recipe.run.run_dir
    created = create_run_dir(run_dir)
    lock = None if lock_held_by_launcher(run_dir, env) else RunLock.acquire(run_dir)
    try:
        # Checked again under the lock: another run may have written here since the first check.
        check_run_dir(recipe, resume, overwrite, overwrite_foreign)
        if overwrite and not resume and holds_results(run_dir):
            clear_run(run_dir, foreign=overwrite_foreign)
        write_marker(run_dir, created)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


# ------------------------------------------------------------------------------------------ spo eval's output

EVAL_FILES = (EVAL_MARKER, LOCK_FILE, "results.json", "table.md")  # what spo eval writes at the top of its output
_EVAL_UNIT = ("*@*.jsonl", "*@*.json")  # in a checkpoint's folder: <set>@<budget>.jsonl, .json and .settings.json


def eval_foreign_entries(out_dir: Path) -> list[str]:
    """The entries of a `spo eval` output directory that spo eval did not write, as paths relative to it ([] for a
    missing or empty one). Without its marker, a directory laid out as spo eval writes (its results, the folders of
    evaluated checkpoints with their completions, and nothing else) is an output of a spo version before the marker;
    any other directory is not spo eval's at all: everything in it is foreign."""
    if not out_dir.is_dir():
        return []
    labels = _eval_labels(out_dir)
    foreign = _foreign_in_eval_layout(out_dir, out_dir, labels)
    if labels is None and not foreign and not _legacy_eval_labels(out_dir):
        return sorted(e.name for e in out_dir.iterdir() if e.name != LOCK_FILE and _matching(e.name, _STAGING) is None)
    return foreign


def _eval_labels(out_dir: Path) -> list[str] | None:
    """The checkpoint folders spo eval recorded in its marker; None where there is no marker."""
    if not (out_dir / EVAL_MARKER).is_file():
        return None
    labels = _read_json_object(out_dir / EVAL_MARKER).get("labels")
    return [label for label in labels if isinstance(label, str)] if isinstance(labels, list) else []


def _legacy_eval_labels(out_dir: Path) -> list[str]:
    """The checkpoint folders of an output written before the marker: those holding a unit's settings."""
    units = [*out_dir.glob("*/*@*.settings.json"), *out_dir.glob("*/*/*@*.settings.json")]  # labels: 1 or 2 levels
    return sorted({p.parent.relative_to(out_dir).as_posix() for p in units})


def _foreign_in_eval_layout(out_dir: Path, folder: Path, labels: list[str] | None) -> list[str]:
    """What in `folder` (under `out_dir`) is not laid out as spo eval writes: its results at the top, the folders of
    the checkpoint `labels` (None: any folder one or two levels down, as before the marker) holding units."""
    rel = folder.relative_to(out_dir).as_posix() if folder != out_dir else ""
    foreign: list[str] = []
    for entry in sorted(folder.iterdir()):
        path = f"{rel}/{entry.name}" if rel else entry.name
        real_dir = entry.is_dir() and not entry.is_symlink()
        if (not rel and entry.name in EVAL_FILES) or _matching(entry.name, _STAGING):
            continue
        if real_dir and _is_label_folder(path, labels):
            foreign += _foreign_in_eval_layout(out_dir, entry, labels)
        elif not real_dir and rel and (labels is None or rel in labels) and _matching(entry.name, _EVAL_UNIT):
            continue
        else:
            foreign.append(path)
    return foreign


def _is_label_folder(path: str, labels: list[str] | None) -> bool:
    if labels is None:
        return path.count("/") < 2
    return any(label == path or label.startswith(path + "/") for label in labels)


def check_eval_out(out_dir: Path) -> None:
    """Refuse, changing nothing, a `spo eval --out` that holds files spo eval did not write (naming them)."""
    foreign = eval_foreign_entries(out_dir)
    if foreign:
        raise SpoUserError(
            f"--out {out_dir} holds files spo eval did not write: {some_names(foreign)}; spo eval writes only into a "
            f"new or empty directory or its own output ({EVAL_MARKER}): move them away or choose another --out"
        )


def claim_eval_out(out_dir: Path, labels: Iterable[str]) -> RunLock:
    """Check, create, lock and mark `spo eval`'s output directory, recording the checkpoint folders it is about to
    write (before it writes them); returns the lock, which a second `spo eval` on it meets at once."""
    check_eval_out(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(out_dir, "spo eval")
    try:
        check_eval_out(out_dir)  # again under the lock: another eval may have written here since
        _record_eval_labels(out_dir, labels)
    except BaseException:
        lock.release()
        raise
    return lock


def _record_eval_labels(out_dir: Path, labels: Iterable[str]) -> None:
    from spo_cli.fsutil import atomic_write_json

    marked = (out_dir / EVAL_MARKER).is_file()
    # New, or an output from before the marker: the checkpoint folders it holds are spo eval's.
    recorded = _eval_labels(out_dir) if marked else _legacy_eval_labels(out_dir)
    added = [label for label in dict.fromkeys(labels) if label not in recorded]
    if marked and not added:
        return
    atomic_write_json(out_dir / EVAL_MARKER, {"spo_eval": 1, "labels": recorded + added})
