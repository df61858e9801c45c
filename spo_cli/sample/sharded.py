"""A sampler split between the processes of a distributed run (`spo_cli.distributed.Cluster`)."""

from __future__ import annotations

from collections.abc import Sequence

from spo_cli.distributed import Cluster
from spo_cli.sample.base import Completion, Sampler, SamplingParams


class ShardedSampler:
    """A sampler whose calls are split between the processes and gathered: each process generates its share of the
    requests (split at multiples of the backend's `shard_unit`, so every request draws the same randomness as in a
    one-process call) and every process returns all completions, in order."""

    def __init__(self, inner: Sampler, cluster: Cluster):
        self.inner = inner
        self.cluster = cluster

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.inner.encode_prompts(prompts)

    def shard_unit(self, params: SamplingParams) -> int:
        return self.inner.shard_unit(params)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, seed: int, offset: int = 0
    ) -> list[list[Completion]]:
        return self.generate_ids(self.encode_prompts(prompts), params, seed, offset)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int,
        offset: int = 0,
        caps: Sequence[int] | None = None,
        **per_request,
    ) -> list[list[Completion]]:
        """`per_request`: further per-prompt sequences the inner sampler takes (the tool loop's `calls_made`),
        split like the prompts."""
        if offset % self.inner.shard_unit(params):
            raise ValueError("a sharded call must start at a multiple of the sampler's shard unit")
        start, end = self.cluster.bounds(len(prompt_ids), self.inner.shard_unit(params))
        local_caps = None if caps is None else caps[start:end]
        local = []
        if end > start:
            local_extra = {name: values[start:end] for name, values in per_request.items() if values is not None}
            local = self.inner.generate_ids(
                prompt_ids[start:end], params, seed, offset + start, local_caps, **local_extra
            )
        return self.cluster.gather(local)

    def sync_weights(self) -> None:
        self.inner.sync_weights()

    def sleep(self) -> None:
        self.inner.sleep()
