"""Monte Carlo state values by sampling continuations with the live policy (the I/O side of `mc_chain`, `vineppo`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from spo_cli.estimate.mc_chain import ValueState
from spo_cli.sample import Sampler, SamplingParams, sampling_params
from spo_cli.tasks import Task
from spo_cli.seeding import derive_seed


@dataclass
class MonteCarloValues:
    """V(state) = mean reward of `params.n` continuations sampled from the state.

    A continuation cut by its token budget scores `unfinished_penalty`; a finished one is graded on the
    whole response (the state's prefix text plus the continuation), as the reference grades rollouts.
    Each iteration's rollouts draw from a seed derived from (run seed, iteration), so a resumed run or a
    standalone `spo estimate-values` samples exactly the rollouts the training loop did.
    """

    sampler: Sampler
    tokenizer: object
    task: Task
    params: SamplingParams  # params.max_total_tokens (the context) caps each rollout: min(budget, context - state)
    unfinished_penalty: float
    run_seed: int
    seed_label: str = "mc_chain"  # the estimator kind: each kind draws its own rollout stream
    generated_tokens: int = 0  # tokens of every continuation sampled so far (what the rollouts cost)

    def __call__(self, states: Sequence[ValueState], iteration: int) -> list[float]:
        if not states:
            return []
        inputs = [list(s.prompt_token_ids) + list(s.prefix_token_ids) for s in states]
        seed = derive_seed(self.run_seed, self.seed_label, iteration)
        if any(s.tool_calls for s in states):  # only a tool loop's episodes have calls (docs/tools.md)
            calls = [s.tool_calls for s in states]
            groups = self.sampler.generate_ids(inputs, self.params, seed=seed, calls_made=calls)
        else:
            groups = self.sampler.generate_ids(inputs, self.params, seed=seed)
        texts, golds, reasons, owner = [], [], [], []
        self.generated_tokens += sum(len(c.token_ids) for group in groups for c in group)
        for k, (state, group) in enumerate(zip(states, groups)):
            prefix = self.tokenizer.decode(list(state.prefix_token_ids), skip_special_tokens=True)
            for c in group:
                texts.append(prefix + c.text)
                golds.append(state.gold)
                reasons.append(c.finish_reason)
                owner.append(k)
        rewards = self.task.grade(texts, golds)
        totals = [0.0] * len(states)
        counts = [0] * len(states)
        for k, reward, reason in zip(owner, rewards, reasons):
            totals[k] += self.unfinished_penalty if reason == "length" else reward
            counts[k] += 1
        return [t / c if c else 0.0 for t, c in zip(totals, counts)]


def build_state_values(recipe, sampler: Sampler, tokenizer, task: Task, max_context: int | None) -> MonteCarloValues:
    """The Monte Carlo value callable of a recipe whose estimator samples rollouts (its spec has `rollouts`,
    `max_new_tokens` and `unfinished_penalty`: mc_chain, vineppo).

    `max_context` is the model's context, used unless the recipe sets sampling.max_context_length.
    """
    spec = recipe.estimator
    params = replace(
        sampling_params(recipe.sampling, task.stop, max_context),
        n=spec.rollouts,
        max_new_tokens=spec.max_new_tokens or recipe.sampling.max_completion_length,
        logprobs=False,
    )
    return MonteCarloValues(sampler, tokenizer, task, params, spec.unfinished_penalty, recipe.run.seed, spec.kind)
