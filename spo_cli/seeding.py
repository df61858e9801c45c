"""Seeds derived from names: every random stream of a run is a pure function of (run.seed, stage, iteration, ...),
so a resumed run, a standalone stage or another process draws exactly what an uninterrupted run draws."""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from parts (Python's hash() of str is salted per process, so not that)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def epoch_slice(n_items: int, start: int, count: int, seed: int) -> list[int]:
    """Indices `start .. start+count` of an endless stream of seeded per-epoch shuffles of range(n_items).

    The data position of a run is just `start`, so resuming needs no sampler state beyond the iteration.
    """
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n_items)
        order = list(range(n_items))
        random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
        take = order[offset : offset + count - len(out)]
        out.extend(take)
        pos += len(take)
    return out
