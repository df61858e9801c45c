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



def _saved_warm_start(tmp_path: Path, recipe_path: Path, overrides: list[str] = ()) -> Path:
    """A directory laid out as `spo sft` leaves one, its record made from `recipe_path` with `overrides`."""
    from spo_cli.recipe import WARM_START_RECORD, warm_start_record

    made = load_recipe(recipe_path, list(overrides))
    folder = tmp_path / "warm" / "warm_start"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    record = warm_start_record(made.model, made.warm_start, made.task, made.run.seed)
    (folder / WARM_START_RECORD).write_text(json.dumps(record))
    return folder


def test_warm_start_load_from_accepts_a_warm_start_of_the_same_settings(tmp_path):
    grpo, single_stream = REPO / "recipes" / "tiny_arith_grpo.yaml", REPO / "recipes" / "tiny_arith_single_stream.yaml"
    saved = _saved_warm_start(tmp_path, grpo)
    # Another method, seed and task pool are allowed: only model and warm_start settings make the warm start.
    r = load_recipe(single_stream, [f"warm_start.load_from={saved}", "run.seed=3", "warm_start.log_every=7"])
    assert r.warm_start.load_from == str(saved) and r.warm_start.steps == 1600


def test_warm_start_load_from_refuses_other_settings_naming_them(tmp_path):
    grpo = REPO / "recipes" / "tiny_arith_grpo.yaml"
    saved = _saved_warm_start(tmp_path, grpo, ["model.hidden_size=64", "warm_start.steps=300"])
    msg = str(pytest.raises(SpoUserError, load_recipe, grpo, [f"warm_start.load_from={saved}"]).value)
    assert "warm_start.load_from" in msg
    assert "model.hidden_size: 64 there, 128 here" in msg and "warm_start.steps: 300 there, 1600 here" in msg


def test_warm_start_load_from_must_be_a_saved_warm_start(tmp_path):
    grpo = REPO / "recipes" / "tiny_arith_grpo.yaml"
    msg = str(pytest.raises(SpoUserError, load_recipe, grpo, [f"warm_start.load_from={tmp_path / 'nope'}"]).value)
    assert "warm_start.load_from" in msg and "not a saved warm start" in msg
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    msg = str(pytest.raises(SpoUserError, load_recipe, grpo, [f"warm_start.load_from={tmp_path / 'hf'}"]).value)
    assert "has no warm_start.json" in msg and "model.kind: pretrained" in msg
    saved = _saved_warm_start(tmp_path, grpo)
    (saved / "warm_start.json").write_text("[1, 2")
    msg = str(pytest.raises(SpoUserError, load_recipe, grpo, [f"warm_start.load_from={saved}"]).value)
    assert "cannot read" in msg and "warm_start.json" in msg


def test_warm_start_differences_name_the_field():
    from spo_cli.recipe import warm_start_differences, warm_start_mismatches

    saved = {"model": {"kind": "tiny", "hidden_size": 64}, "warm_start": {"steps": 10}, "task": {"max_steps": 5}, "seed": 0}
    here = {"model": {"kind": "tiny", "hidden_size": 64}, "warm_start": {"steps": 10}, "task": {"max_steps": 6}, "seed": 2}
    assert warm_start_mismatches(saved, here) == []
    assert warm_start_differences(saved, here) == ["task.max_steps: 5 there, 6 here", "run.seed: 0 there, 2 here"]
    assert warm_start_mismatches(saved, {**here, "model": {"kind": "tiny"}}) == ["model.hidden_size: 64 there, None here"]


def test_step_openers_refuse_what_would_break_a_solution_line(tmp_path):
    ok = parse_recipe({"model": {"kind": "tiny"}, "task": {"kind": "arith", "step_openers": ["So ", ""]}})
    assert ok.task.step_openers == ["So ", ""]
    # A digit would read as part of the line's numbers, "#" as the answer marker, a newline as another line.
    for bad in ["So\n", "3 ", "# "]:
        with pytest.raises(SpoUserError, match=r"task\.step_openers\.0"):
            parse_recipe({"model": {"kind": "tiny"}, "task": {"kind": "arith", "step_openers": [bad]}})


def test_a_tools_section_validates_and_names_its_fields(tmp_path):
    tools = "  tools:\n    max_tool_calls: 4\n    sandbox: {kind: sandbox_fusion, url: 'http://sandbox:8080'}\n"
    recipe = load_recipe(_write(tmp_path, GOOD + tools))
    assert recipe.sampling.tools.max_tool_calls == 4 and recipe.sampling.tools.sandbox.url == "http://sandbox:8080"
    assert load_recipe(_write(tmp_path, GOOD + "  tools: {}\n")).sampling.tools.sandbox.kind == "local"
    bad = _write(tmp_path, GOOD + "  tools:\n    wall_seconds: 0\n")
    assert "sampling.tools.wall_seconds" in str(pytest.raises(SpoUserError, load_recipe, bad).value)
