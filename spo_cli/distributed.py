"""The processes of a run: who this one is, how work is split between them and how results come back.

A run of several processes (DDP or DeepSpeed, started by `spo_cli.launch`) keeps every process's view of the
iteration identical: each samples, scores or trains its share of the work, and the results are gathered so that
every process holds all of them. Estimation, the tracker and the replay buffer then run the same code on the same
data everywhere, so no process ever has to ask another what it decided. Only the main process writes files.

`LOCAL` is the single-process case: every method is a no-op or the identity, and the code paths are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def shard_bounds(n: int, world_size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """The half-open range [start, end) of `n` items that process `rank` of `world_size` takes.

    Items are dealt in whole units of `unit` consecutive items (a unit is never split), as evenly as possible: the
    first `units % world_size` processes take one unit more. Ranges are contiguous and in rank order, so
    concatenating every process's results restores the original order.
    """
    if world_size < 1 or not 0 <= rank < world_size or unit < 1 or n < 0:
        raise ValueError(f"bad shard request: n={n} world_size={world_size} rank={rank} unit={unit}")
    units = -(-n // unit)
    base, extra = divmod(units, world_size)
    first = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return min(n, first * unit), min(n, (first + count) * unit)


@dataclass(frozen=True)
class Cluster:
    """This process's place among the run's processes (torch.distributed must be initialised when world_size > 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def bounds(self, n: int, unit: int = 1) -> tuple[int, int]:
        return shard_bounds(n, self.world_size, self.rank, unit)

    def gather(self, items: Sequence[T]) -> list[T]:
        """Every process's `items`, concatenated in rank order, on every process."""
        if not self.distributed:
            return list(items)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def map_shards(self, fn: Callable[[list[T]], list[R]], items: Sequence[T], unit: int = 1) -> list[R]:
        """`fn(items)` computed in shards: each process applies `fn` to its share, every process gets all results."""
        start, end = self.bounds(len(items), unit)
        local = fn(list(items[start:end])) if end > start else []
        if len(local) != end - start:
            raise AssertionError(f"map_shards: {len(local)} results for {end - start} items")
        return self.gather(local)

    def broadcast(self, obj: T) -> T:
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over processes (keys missing on a process count 0)."""
        if not self.distributed:
            return dict(values)
        totals: dict[str, float] = {}
        for part in self.gather([values]):
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def sum_gradients(self, parameters: Iterable[Any]) -> None:
        """Replace each parameter's gradient by its sum over processes (a replicated model trained by hand)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


LOCAL = Cluster()


def current_cluster() -> Cluster:
    """The cluster of an initialised torch.distributed process group, else `LOCAL`."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return LOCAL
    return Cluster(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
