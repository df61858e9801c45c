"""The estimator registry is the extension point: an estimator defined and registered in this test's own code (not
in spo_cli) is accepted by recipes, trains through the loop and runs standalone on saved episodes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from ..conftest import REPO, tiny_recipe_dict

# Run in a fresh interpreter: registering changes the recipe model for the rest of the process.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from typing import Literal

    from pydantic import Field
    from rich.console import Console

    from spo_cli.estimate import EstimatorEntry, estimate_advantages, register_estimator
    from spo_cli.estimate.group import group_advantages
    from spo_cli.episode import read_episodes
    from spo_cli.recipe import EstimatorSection, parse_recipe, recipe_schema

    class ScaledGroup(EstimatorSection):
        kind: Literal["scaled_group"] = "scaled_group"
        scale: float = Field(0.5, description="Multiplies GRPO's advantages.")

        def check_recipe(self, recipe):
            if recipe.sampling.num_generations < 2:
                raise ValueError("scaled_group needs groups")

    def scaled_group(episodes, spec, inputs):
        adv = group_advantages([ep.reward for ep in episodes], [ep.group_id for ep in episodes], True, 1e-8)
        out = []
        for ep, a in zip(episodes, adv):
            segments = [s.model_copy(update={"advantage": spec.scale * a}) for s in ep.segments]
            out.append(ep.model_copy(update={"segments": segments, "token_advantages": None}))
        return out, {"scaled_group/scale": spec.scale}

    register_estimator(EstimatorEntry(ScaledGroup, scaled_group))

    data = json.loads(sys.argv[1])
    recipe = parse_recipe(data)
    assert isinstance(recipe.estimator, ScaledGroup) and recipe.estimator.scale == 0.25
    assert "ScaledGroup" in json.dumps(recipe_schema())
    bad = dict(data, sampling={**data["sampling"], "num_generations": 1})
    try:
        parse_recipe(bad)
        raise SystemExit("a recipe the estimator refuses was accepted")
    except Exception as exc:
        assert "scaled_group needs groups" in str(exc), exc

    from spo_cli.train import train

    summary = train(recipe, console=Console(file=open(os.devnull, "w")))
    run = data["run"]["output_dir"]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    trained = read_episodes(os.path.join(run, "episodes", "iter_000002.jsonl"))
    redone, _ = estimate_advantages(trained, recipe.estimator)  # the standalone stage on saved episodes
    print(json.dumps({
        "iterations": summary["iterations"],
        "scales": [r.get("scaled_group/scale") for r in rows],
        "rewards": [ep.reward for ep in trained],
        "groups": [ep.group_id for ep in trained],
        "advantages": [[s.advantage for s in ep.segments] for ep in trained],
        "redone": [[s.advantage for s in ep.segments] for ep in redone],
    }))
    """
)


def test_an_estimator_registered_outside_spo_trains(tmp_path):
    data = tiny_recipe_dict(
        tmp_path, train={"iterations": 2}, eval={"before_training": False, "after_training": False},
        logging={"save_episodes": True},
    )  # fmt: skip
    data["warm_start"] = {"kind": "none"}
    data["estimator"] = {"kind": "scaled_group", "scale": 0.25}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(data)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["iterations"] == 2 and out["scales"] == [0.25, 0.25]
    # Every trained episode carries 0.25 x its GRPO advantage: the registered function, not a built-in, ran.
    by_group: dict[str, list[float]] = {}
    for group, reward in zip(out["groups"], out["rewards"]):
        by_group.setdefault(group, []).append(reward)
    for group, reward, segments in zip(out["groups"], out["rewards"], out["advantages"]):
        rewards = by_group[group]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        assert segments and all(abs(a - 0.25 * (reward - mean) / (std + 1e-8)) < 1e-9 for a in segments)
    assert out["redone"] == out["advantages"]
