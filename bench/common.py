"""What the benchmark scripts share: running `spo` as a user does, and reading a --methods/--seeds selection.

The scripts run as `python bench/<name>.py`, which puts this folder on the import path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spo(*args: str, threads: int | None = None) -> str:
    """`python -m spo_cli <args>` from the repository root (with `threads` torch threads if given); its stdout.
    A failure ends the benchmark with the command and the end of its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    out = subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"spo {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return out.stdout


def parse_methods(text: str, known: Iterable[str]) -> list[str]:
    """A comma-separated selection of `known` names, in the order given; an unknown name ends the benchmark."""
    known = list(known)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in known]:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(known)}")
    return methods


def parse_seeds(text: str) -> list[int]:
    """Comma-separated integer seeds."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: {text!r} is not a comma-separated list of integers") from None
