"""Supervised warm start on a task's worked solutions, so RL starts from real but imperfect accuracy."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from spo_cli.hardware import Runtime
from spo_cli.optimize.schedule import build_scheduler
from spo_cli.policy import collate, forward_logprobs
from spo_cli.recipe import Sft
from spo_cli.tasks import Task, apply_template
from spo_cli.seeding import derive_seed


def encode_examples(tokenizer, task: Task, problems) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of (prompt, solution + EOS) pairs; the loss covers the solution and the EOS."""
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    solution_ids = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
    return prompt_ids, [ids + [tokenizer.eos_token_id] for ids in solution_ids]


def run_sft(
    model,
    tokenizer,
    task: Task,
    spec: Sft,
    runtime: Runtime,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train `model` in place for `spec.steps` AdamW steps; return final metrics."""
    if task.sft_examples is None:
        raise ValueError(f"task {task.name!r} has no worked solutions to warm-start from; use warm_start.kind: none")
    rng = random.Random(derive_seed(seed, "sft"))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2), weight_decay=spec.weight_decay
    )
    scheduler = build_scheduler(
        optimizer,
        total_steps=spec.steps,
        warmup_steps=round(spec.warmup_ratio * spec.steps),
        kind="cosine",
        min_ratio=spec.min_lr_ratio,
    )
    model.train()
    start, recent = time.perf_counter(), []
    for step in range(1, spec.steps + 1):
        prompt_ids, response_ids = encode_examples(tokenizer, task, task.sft_examples(rng, spec.batch_size))
        batch = collate(prompt_ids, response_ids, tokenizer.pad_token_id).to(runtime.device)
        with runtime.autocast():
            logprobs, _ = forward_logprobs(model, batch, temperature=1.0)
        loss = -(logprobs * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if step % spec.log_every == 0 or step == spec.steps:
            log(f"sft step {step}/{spec.steps}  loss {sum(recent) / len(recent):.4f}  {time.perf_counter() - start:.0f}s")
            last, recent = sum(recent) / len(recent), []
    model.eval()
    return {"sft/loss": last, "sft/seconds": time.perf_counter() - start, "sft/steps": float(spec.steps)}
