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
from spo_cli.tools.calls import ToolMarkers, split_tool_outputs


def encode_examples(
    tokenizer, task: Task, problems, markers: ToolMarkers | None = None
) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """Token ids of (prompt, solution + EOS) pairs and the loss mask of each solution token: the solution and the
    EOS, except the tool outputs of a solution with calls (`markers`), which are tokenized apart as the tool loop
    tokenizes them and left out of the loss."""
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    solution_ids, masks = [], []
    for problem in problems:
        pieces = split_tool_outputs(problem.solution, markers) if markers else [(problem.solution, False)]
        ids: list[int] = []
        mask: list[float] = []
        for text, by_tool in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [0.0 if by_tool else 1.0] * len(piece)
        solution_ids.append(ids + [tokenizer.eos_token_id])
        masks.append(mask + [1.0])
    return prompt_ids, solution_ids, masks


def run_sft(
    model,
    tokenizer,
    task: Task,
    spec: Sft,
    runtime: Runtime,
    seed: int,
    log: Callable[[str], None] = print,
    markers: ToolMarkers | None = None,
) -> dict[str, float]:
    """Train `model` in place for `spec.steps` AdamW steps; return final metrics. With `markers` (the recipe's
    tools), the tool outputs in the worked solutions are not trained."""
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
        examples = task.sft_examples(rng, spec.batch_size)
        prompt_ids, response_ids, masks = encode_examples(tokenizer, task, examples, markers)
        batch = collate(prompt_ids, response_ids, tokenizer.pad_token_id).to(runtime.device)
        mask = batch.response_mask * batch.scatter(masks)
        with runtime.autocast():
            logprobs, _ = forward_logprobs(model, batch, temperature=1.0)
        loss = -(logprobs * mask).sum() / mask.sum()
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
