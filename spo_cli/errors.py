"""Errors shown to the user without a traceback: `SpoUserError` (exit 2) for what they gave us, `SpoError` (exit 1)
for a failure of the machine around spo (a full disk) that leaves the run resumable."""

from __future__ import annotations

import errno


class SpoError(Exception):
    """A failure that is neither the user's input nor a bug in spo; the message says what survived and what to do."""

    exit_code = 1


class SpoUserError(SpoError):
    """A problem with what the user gave us (a recipe, a file, a flag), not a bug in spo.

    The message must name the problem precisely: a recipe field path, or a file and line.
    """

    exit_code = 2


# What the user fixes by changing permissions or choosing another path; any other failure to read or write a file
# (a full disk, an I/O error) is the machine's.
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def from_os_error(exc: OSError) -> SpoError | None:
    """The one-line error for an OSError about a file (e.g. writing into a read-only directory): a SpoUserError for
    permissions or a bad path, a SpoError for the machine (a full disk). None when it names no file: then it is
    nothing the user gave us, and its traceback is what a bug report needs."""
    if exc.filename is None:
        return None
    path = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _PERMISSION_ERRNOS:
        return SpoUserError(
            f"{path}: {reason}: spo cannot write (or read) there as this user; change its permissions or choose "
            "another path"
        )
    if exc.errno in _PATH_ERRNOS:
        return SpoUserError(f"{path}: {reason}")
    if exc.errno in _FULL_ERRNOS:
        return SpoError(f"{path}: {reason}: free some space and run the command again")
    return SpoError(f"{path}: {reason}")
