"""Splitting work between processes (pure arithmetic) and the single-process cluster."""

from __future__ import annotations

import pytest

from spo_cli.distributed import LOCAL, Cluster, shard_bounds


def test_shard_bounds_deal_whole_units_in_rank_order():
    # 10 items, 3 processes, units of 1: 10 = 4 + 3 + 3, the first process takes the extra one.
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    # Units of 4 (e.g. prompts per generate call): 3 units, one each; the last unit is short.
    assert [shard_bounds(10, 3, r, unit=4) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]
    # 5 items in units of 2 over 4 processes: 3 units for 4 processes, the last one gets nothing.
    assert [shard_bounds(5, 4, r, unit=2) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [shard_bounds(0, 2, r) for r in range(2)] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("n,world,unit", [(1, 1, 1), (17, 2, 3), (256, 8, 32), (7, 16, 1), (100, 3, 7)])
def test_shards_cover_every_item_once_at_unit_boundaries(n, world, unit):
    bounds = [shard_bounds(n, world, r, unit) for r in range(world)]
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(n))
    assert all(start % unit == 0 for start, end in bounds if end > start)
    sizes = [-(-(end - start) // unit) for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_bad_shard_requests_are_refused():
    for args in [(5, 0, 0), (5, 2, 2), (5, 2, -1), (5, 2, 0, 0), (-1, 1, 0)]:
        with pytest.raises(ValueError):
            shard_bounds(*args)


def test_the_local_cluster_is_the_identity():
    assert LOCAL == Cluster(0, 1, 0) and LOCAL.is_main and not LOCAL.distributed
    assert LOCAL.gather([1, 2]) == [1, 2]
    assert LOCAL.map_shards(lambda xs: [x * 10 for x in xs], [1, 2, 3]) == [10, 20, 30]
    assert LOCAL.sum_floats({"a": 1.5}) == {"a": 1.5}
    assert LOCAL.broadcast({"x": 1}) == {"x": 1}
    LOCAL.barrier()
    with pytest.raises(AssertionError, match="results"):
        LOCAL.map_shards(lambda xs: xs[:-1], [1, 2])
