"""Run by test_vllm_distributed.py under `torchrun --nproc_per_node 2`: a gloo process group first (as Accelerate
makes one), then one colocated vLLM engine per process via build_sampler; writes what each process saw."""

from __future__ import annotations

import json
import sys


def main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from spo_cli.distributed import current_cluster
    from spo_cli.sample.sharded import ShardedSampler
    from spo_cli.hardware import Runtime
    from spo_cli.models import build_byte_tokenizer, build_tiny_model
    from spo_cli.recipe import Sampling, TinyModel
    from spo_cli.sample import SamplingParams, build_sampler
    from spo_cli.sample.hf import HFSampler

    cpu = Runtime(device="cpu", bf16=False)
    cluster = current_cluster()
    tokenizer = build_byte_tokenizer()
    spec = TinyModel(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    model = build_tiny_model(spec, tokenizer, seed=0).eval()
    sampler = build_sampler(Sampling(backend="vllm"), model, tokenizer, cpu, cluster=cluster, seed=0)
    assert isinstance(sampler, ShardedSampler)
    prompts = [f"Start at {i}. Add 3. Result?" for i in range(7)]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16)
    sharded = sampler.generate(prompts, params, seed=5)
    whole = sampler.inner.generate(prompts, params, seed=5)  # this process's engine alone, the whole call
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    sampler.sync_weights()
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16, logprobs=False)
    synced = sampler.generate(prompts, greedy, seed=0)
    reference = HFSampler(model, tokenizer, cpu).generate(prompts, greedy, seed=0)
    sampler.inner.close()
    total = torch.tensor([cluster.rank + 1.0])
    dist.all_reduce(total)  # the trainer's process group outlives the engine
    result = {
        "sharded": [[[c.token_ids, c.logprobs] for c in g] for g in sharded],
        "whole": [[[c.token_ids, c.logprobs] for c in g] for g in whole],
        "synced": [[c.token_ids for c in g] for g in synced],
        "reference": [[c.token_ids for c in g] for g in reference],
        "all_reduce": total.item(),
    }
    with open(f"{out_dir}/rank{cluster.rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
