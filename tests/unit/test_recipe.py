from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml

from spo_cli.errors import SpoUserError
from spo_cli.recipe import (
    EstimatorSpec,
    LossSpec,
    ModelSpec,
    PartitionerSpec,
    Recipe,
    TaskSpec,
    WarmStartSpec,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_schema,
)

REPO = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = sorted((REPO / "recipes" / "launch").glob("*.yaml"))
RECIPES = sorted(p for p in (REPO / "recipes").glob("**/*.yaml") if p not in LAUNCH_CONFIGS)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny_arith_grpo.yaml", "rho_gsm8k_grpo.yaml", "qwen_math_grpo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_launch_configs_are_accelerate_configs_a_recipe_accepts():
    from accelerate.commands.config.config_args import load_config_from_file

    assert {p.stem for p in LAUNCH_CONFIGS} == {"single_gpu", "ddp", "zero2", "zero3"}
    expected = {"single_gpu": ("NO", None), "ddp": ("MULTI_GPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}
    for path in LAUNCH_CONFIGS:
        config = load_config_from_file(str(path))
        kind, stage = expected[path.stem]
        assert config.distributed_type == kind, path.name
        assert (config.deepspeed_config or {}).get("zero_stage") == stage, path.name
        assert config.mixed_precision == "no", "precision is the recipe's (hardware.precision)"
        if stage is not None:
            assert config.deepspeed_config["zero3_init_flag"] is False, "spo builds whole models"
        recipe = parse_recipe({"model": {"kind": "tiny"}, "task": {"kind": "arith"},
                               "hardware": {"accelerate_config": str(path)}})  # fmt: skip
        assert recipe.hardware.distributed


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = """\
model:
  kind: tiny
task:
  kind: arith
sampling:
  temperature: 0.7
"""


def test_unknown_key_names_path_and_line(tmp_path):
    p = _write(tmp_path, GOOD + "  temprature: 1.0\n")
    with pytest.raises(SpoUserError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert "sampling.temprature (line 7): unknown field" in msg
    assert str(p) in msg


def test_wrong_type_and_out_of_range(tmp_path):
    p = _write(tmp_path, GOOD.replace("0.7", "hot") + "train:\n  iterations: 0\n")
    msg = str(pytest.raises(SpoUserError, load_recipe, p).value)
    assert "sampling.temperature (line 6)" in msg and "'hot'" in msg
    assert "train.iterations (line 8)" in msg and "greater than or equal to 1" in msg


def test_unknown_kind_lists_choices(tmp_path):
    p = _write(tmp_path, GOOD.replace("kind: tiny", "kind: huge"))
    msg = str(pytest.raises(SpoUserError, load_recipe, p).value)
    assert "model (line 1): unknown kind 'huge'" in msg and "'tiny'" in msg


def test_missing_required_section(tmp_path):
    p = _write(tmp_path, "model:\n  kind: tiny\n")
    assert "task: Field required" in str(pytest.raises(SpoUserError, load_recipe, p).value)


def test_missing_data_file_is_named(tmp_path):
    p = _write(tmp_path, "model: {kind: tiny}\ntask: {kind: gsm8k, train_file: /nonexistent/train.jsonl}\n")
    msg = str(pytest.raises(SpoUserError, load_recipe, p).value)
    assert "task" in msg and "/nonexistent/train.jsonl" in msg


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpoUserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = _write(tmp_path, "model: {kind: tiny\ntask: x\n")
    assert f"{p}:" in str(pytest.raises(SpoUserError, load_recipe, p).value)


def test_cross_field_check_group_needs_two_generations(tmp_path):
    p = _write(tmp_path, GOOD + "  num_generations: 1\n")
    assert "num_generations >= 2" in str(pytest.raises(SpoUserError, load_recipe, p).value)


def test_overrides_apply_and_validate(tmp_path):
    p = _write(tmp_path, GOOD)
    r = load_recipe(p, ["sampling.temperature=0.3", "run.seed=7", "optim.learning_rate=3e-5", "task.eval_steps=[3,4]"])
    assert r.sampling.temperature == 0.3 and r.run.seed == 7 and r.optim.learning_rate == 3e-5
    assert r.task.eval_steps == [3, 4]
    with pytest.raises(SpoUserError, match="sampling.nope"):
        load_recipe(p, ["sampling.nope=1"])
    with pytest.raises(SpoUserError, match="expected key.sub=value"):
        load_recipe(p, ["sampling.temperature"])
    with pytest.raises(SpoUserError, match="is not a section"):
        apply_overrides({"run": {"seed": 1}}, ["run.seed.x=1"])


def test_kind_defaults_where_a_section_has_a_default():
    r = parse_recipe({"model": {"kind": "tiny"}, "task": {"kind": "arith"}, "loss": {"beta": 0.1}, "warm_start": {}})
    assert r.loss.kind == "ppo_clip" and r.loss.beta == 0.1 and r.warm_start.kind == "none"
    with pytest.raises(SpoUserError, match="model: missing `kind`"):
        parse_recipe({"model": {"name_or_path": "x"}, "task": {"kind": "arith"}})


def test_defaults_filled_and_frozen():
    r = parse_recipe(yaml.safe_load(GOOD))
    assert r.loss.kind == "ppo_clip" and r.estimator.kind == "group" and r.partitioner.kind == "whole"
    assert r.run.run_dir == Path("runs/run")
    with pytest.raises(Exception):
        r.sampling.temperature = 2.0  # type: ignore[misc]


def test_every_field_has_a_description():
    schema = recipe_schema()
    missing = []
    for name, definition in schema.get("$defs", {}).items():
        for field, prop in definition.get("properties", {}).items():
            if field != "kind" and "description" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing, missing
    json.dumps(schema)


@pytest.mark.parametrize("union", [ModelSpec, TaskSpec, WarmStartSpec, PartitionerSpec, EstimatorSpec, LossSpec])
def test_every_union_member_forbids_extra_keys(union):
    inner = get_args(union)[0]
    members = [get_args(m)[0] if get_args(m) else m for m in (get_args(inner) or (inner,))]
    if len(members) == 1 and get_args(inner):  # a lone member is Annotated[Model, Tag]
        members = [get_args(inner)[0]]
    for member in members:
        assert member.model_config.get("extra") == "forbid"


def test_all_sections_forbid_extra_keys():
    for name, field in Recipe.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type):
            assert ann.model_config.get("extra") == "forbid", name


def test_kind_override_starts_the_section_afresh(tmp_path):
    path = REPO / "recipes" / "tiny_arith_chain.yaml"
    # cutpoint's rho/interval would be unknown fields of fixed_count; a kind switch drops them,
    # and fields given for the new kind apply whatever their order on the command line.
    r = load_recipe(path, ["partitioner.num_segments=3", "partitioner.kind=fixed_count"])
    assert r.partitioner.kind == "fixed_count" and r.partitioner.num_segments == 3
    # re-stating the same kind keeps the section's other fields
    r = load_recipe(path, ["partitioner.kind=cutpoint", "partitioner.interval=10"])
    assert (r.partitioner.rho, r.partitioner.interval) == (0.9, 10)

