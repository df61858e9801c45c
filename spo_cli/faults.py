"""Crash points: where the fault tests kill a training run, named so a test can pick the moment exactly.

`SPO_CRASH_AT=<point>:<iteration>` (e.g. `optimize:3`) makes the process SIGKILL itself when it reaches that point
of that iteration, which a test outside the process cannot time reliably. Unset (always, outside the tests) it
costs one environment lookup per point passed.

| point      | where                                                                        |
|------------|------------------------------------------------------------------------------|
| sample     | the iteration's responses are sampled, nothing of the iteration is saved yet |
| optimize   | after the iteration's first optimizer step: weights changed only in memory   |
| checkpoint | half-way through writing the checkpoint (model written, rest not)            |
| publish    | the checkpoint directory is in place, the `latest` pointer not yet updated   |
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "SPO_CRASH_AT"
POINTS = ("sample", "optimize", "checkpoint", "publish")


def crash_point(point: str, iteration: int) -> None:
    """SIGKILL this process if $SPO_CRASH_AT names this point and iteration."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted is not None and wanted == f"{point}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
