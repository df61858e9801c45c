"""Atomic file and directory writes: a crash or kill leaves either the old state or the new one."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any


class atomic_open:
    """Open a temporary file beside `path` for writing text; on success fsync and rename it over `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        if self.path.is_dir():  # the rename at the end would fail, after all the work of writing
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fh = self.tmp.open("w", encoding="utf-8")
        except OSError as exc:  # e.g. a read-only directory: name the file being written, not our temporary one
            raise type(exc)(exc.errno, exc.strerror, str(self.path)) from None
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            return False
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:  # e.g. a full disk, or `path` made a directory meanwhile: leave no temporary file
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            raise type(exc)(exc.errno, exc.strerror, str(self.path)) from None
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written `staging` directory to `final`, replacing any old one.

    A rename is atomic only onto a missing or empty target, so an old `final` is first renamed aside
    and deleted after the new one is in place.
    """
    for f in staging.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
