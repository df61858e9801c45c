"""Errors shown to the user without a traceback: `SpoUserError` (exit 2) for what they gave us, `SpoError` (exit 1)
for a failure of the machine around spo (a full disk) that leaves the run resumable."""

from __future__ import annotations


class SpoError(Exception):
    """A failure that is neither the user's input nor a bug in spo; the message says what survived and what to do."""

    exit_code = 1


class SpoUserError(SpoError):
    """A problem with what the user gave us (a recipe, a file, a flag), not a bug in spo.

    The message must name the problem precisely: a recipe field path, or a file and line.
    """

    exit_code = 2
