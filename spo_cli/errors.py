"""User-facing errors. Anything raised as `SpoUserError` is printed without a traceback and exits 2."""

from __future__ import annotations


class SpoUserError(Exception):
    """A problem with what the user gave us (a recipe, a file, a flag), not a bug in spo.

    The message must name the problem precisely: a recipe field path, or a file and line.
    """

    exit_code = 2
