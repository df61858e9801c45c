"""Evaluation. This module: held-out accuracy of the policy during training (greedy and sampled).

`spo eval` lives beside it: `metrics` (budgets, pass@k, majority vote), `benchmarks` (the sets and their
graders) and `runner` (checkpoints x budgets x sets, resumable).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from spo_cli.evaluate.metrics import sampling_standard_error
from spo_cli.recipe import Eval
from spo_cli.sample import Sampler, SamplingParams
from spo_cli.tasks import Problem, Task, apply_template
from spo_cli.tools.calls import tool_call_metrics


def accuracy(rewards: Sequence[float]) -> float:
    """Fraction of responses graded fully correct (reward 1)."""
    return sum(1 for r in rewards if r >= 1.0) / len(rewards) if rewards else 0.0


def evaluate_policy(
    sampler: Sampler,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    spec: Eval,
    max_new_tokens: int,
    seed: int,
    keep_eos_token: bool = True,
    tools: bool = False,
) -> dict[str, float]:
    """`eval/greedy_accuracy` and `eval/sampled_accuracy` (mean over `spec.num_samples` per problem), with
    `eval/sampled_accuracy_se`, its standard error from the sampling alone (with 2 or more samples per problem).
    With `tools` (the sampler runs a tool loop), each run's `tool_call_frequency` and `tool_failure_frequency`."""
    problems = list(problems)[: spec.max_problems]
    prompts = [apply_template(tokenizer, task.format_prompt(p.question), task.use_chat_template) for p in problems]
    golds = [p.gold for p in problems]
    out: dict[str, float] = {"eval/num_problems": float(len(problems))}
    runs = []
    if spec.greedy:
        runs.append(("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)))
    if spec.num_samples > 0:
        runs.append(
            (
                "sampled",
                SamplingParams(
                    n=spec.num_samples,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    top_k=spec.top_k,
                    max_new_tokens=max_new_tokens,
                ),
            )
        )
    for name, params in runs:
        params = dataclasses.replace(params, stop=task.stop, keep_eos_token=keep_eos_token, logprobs=False)
        groups = sampler.generate(prompts, params, seed=seed)
        responses = [c.text for g in groups for c in g]
        reasons = [c.finish_reason for g in groups for c in g]
        rewards = task.rewards(responses, [gold for gold, g in zip(golds, groups) for _ in g], reasons)
        out[f"eval/{name}_accuracy"] = accuracy(rewards)
        if params.n >= 2:
            ends = list(itertools.accumulate(len(g) for g in groups))
            correct = [sum(1 for r in rewards[end - params.n : end] if r >= 1.0) for end in ends]
            out[f"eval/{name}_accuracy_se"] = sampling_standard_error(correct, params.n)
        out[f"eval/{name}_mean_length"] = sum(len(c.token_ids) for g in groups for c in g) / max(len(responses), 1)
        if tools:
            calls = tool_call_metrics([c.tool_calls for g in groups for c in g])
            out |= {f"eval/{name}_{key}": value for key, value in calls.items()}
    return out

