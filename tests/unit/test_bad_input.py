"""Bad input never gets a traceback: generated bad recipes, damaged episode and data files, adversarial responses
for the graders, and YAML that would construct Python objects."""

from __future__ import annotations

import json
import tempfile
import time
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Recipe, parse_recipe

from ..conftest import TINY_RECIPE, spo_in_process, tiny_recipe_dict, write_recipe

# --------------------------------------------------------------------------------------------- recipes


def _base(run_dir: Path) -> dict:
    data = json.loads(json.dumps(TINY_RECIPE))
    data["run"]["output_dir"] = str(run_dir)
    return data


BASE = parse_recipe(_base(Path("unused")))
SECTIONS = list(Recipe.model_fields)


def _section_model(section: str) -> type:
    """The section's class: that of its value in the base recipe, or, for an optional section the base recipe
    leaves out (lora), the class its annotation names."""
    value = getattr(BASE, section)
    if value is not None:
        return type(value)
    (model,) = [a for a in typing.get_args(Recipe.model_fields[section].annotation) if a is not type(None)]
    return model


def _plain(annotation) -> type | None:
    """int, float, bool or str for a field of that type (optional or not); None for anything else."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _plain(inner[0]) if len(inner) == 1 else None
    return annotation if annotation in (int, float, bool, str) else None


def _fields() -> list[tuple[str, str, type, list]]:
    """(section, field, type, constraints) of every plain field of the base recipe's sections."""
    out = []
    for section in SECTIONS:
        for name, info in _section_model(section).model_fields.items():
            kind = _plain(info.annotation)
            if kind is not None and name != "kind":
                out.append((section, name, kind, list(info.metadata)))
    return out


FIELDS = _fields()
NUMERIC_BOUNDS = [(s, n, k, m) for s, n, k, m in FIELDS if k in (int, float) and any(
    isinstance(c, annotated_types.Ge | annotated_types.Gt | annotated_types.Le | annotated_types.Lt) for c in m)]  # fmt: skip
KIND_SECTIONS = [s for s in SECTIONS if "kind" in _section_model(s).model_fields]


@st.composite
def out_of_range(draw):
    section, name, kind, constraints = draw(st.sampled_from(NUMERIC_BOUNDS))
    bound = draw(st.sampled_from([c for c in constraints if not isinstance(c, annotated_types.MultipleOf)]))
    step = draw(st.integers(1, 10**6)) if kind is int else draw(st.floats(1e-3, 1e6))
    match bound:
        case annotated_types.Ge(ge=v):
            value = v - step
        case annotated_types.Gt(gt=v):
            value = v - (step - 1 if kind is int else step)
        case annotated_types.Le(le=v):
            value = v + step
        case annotated_types.Lt(lt=v):
            value = v + (step - 1 if kind is int else step)
    return f"{section}.{name}", [section, name], kind(value)


@st.composite
def wrong_type(draw):
    section, name, kind, _ = draw(st.sampled_from(FIELDS))
    not_a_number = st.text(min_size=1, max_size=12).filter(lambda t: _not_number(t))
    value = draw(st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2),
                           not_a_number if kind in (int, float) else st.nothing()))  # fmt: skip
    return f"{section}.{name}", [section, name], value


def _not_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() not in {"inf", "nan", "infinity", "-inf", "+inf"}
    return False


@st.composite
def unknown_key(draw):
    section = draw(st.sampled_from([*SECTIONS, None]))
    known = set(SECTIONS) if section is None else set(_section_model(section).model_fields)
    key = draw(st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True).filter(lambda k: k not in known))
    path = [key] if section is None else [section, key]
    return ".".join(path), path, 1


def _kinds(annotation) -> set[str]:
    """The `kind` values a section's union accepts."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return {args[0].model_fields["kind"].default}
    return set().union(*(_kinds(a) for a in args))


@st.composite
def unknown_kind(draw):
    section = draw(st.sampled_from(KIND_SECTIONS))
    kind = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
    assume(kind not in _kinds(Recipe.model_fields[section].annotation))
    return section, [section, "kind"], kind


@st.composite
def missing_file(draw):
    name = draw(st.from_regex(r"[a-z]{1,10}", fullmatch=True))
    missing = f"/nonexistent-spo/{name}.jsonl"
    if draw(st.booleans()):
        return "task.train_file", ["task"], {"kind": "gsm8k", "train_file": missing}
    return "model.name_or_path", ["model"], {"kind": "pretrained", "name_or_path": f"/nonexistent-spo/{name}"}


def _set(data: dict, path: list[str], value) -> dict:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data



def _check_refused(data_or_text, expect_in_message: str) -> None:
    """`spo recipe check` and `spo train` both exit 2 naming the problem, with no traceback and no run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        if isinstance(data_or_text, dict):
            run = data_or_text.setdefault("run", {})
            if expect_in_message != "run.output_dir":  # else the bad value under test stays
                run["output_dir"] = str(run_dir)
            text = yaml.safe_dump(data_or_text, sort_keys=False)
        else:
            text = data_or_text.replace("RUN_DIR", str(run_dir))
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text)
        with pytest.raises(SpoUserError):  # never valid by construction; checked before training could start
            from spo_cli.recipe import load_recipe

            load_recipe(path)
        for command in (["recipe", "check"], ["train"]):
            code, err = spo_in_process(*command, str(path))
            assert code == 2, (command, err)
            assert expect_in_message in err, (command, expect_in_message, err)
            assert "Traceback" not in err
        assert not run_dir.exists()


HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPOTHESIS
@given(st.one_of(out_of_range(), wrong_type(), unknown_key()))
def test_bad_fields_exit_2_naming_the_field(case):
    field, path, value = case
    _check_refused(_set(_base(Path("x")), path, value), field)


@HYPOTHESIS
@given(unknown_kind())
def test_unknown_kinds_exit_2_naming_the_section(case):
    section, path, value = case
    _check_refused(_set(_base(Path("x")), path, value), section)


@HYPOTHESIS
@given(missing_file())
def test_missing_files_exit_2_naming_the_field(case):
    field, path, value = case
    data = _base(Path("x"))
    data[path[0]] = value
    _check_refused(data, field)


@HYPOTHESIS
@given(st.text(alphabet="[]{}:,-'\"\t\n #|>&*!%@`abc", min_size=1, max_size=40), st.integers(0, 30))
def test_malformed_yaml_exits_2_naming_the_line(garbage, at):
    lines = yaml.safe_dump(_base(Path("RUN_DIR")), sort_keys=False).splitlines()
    at = min(at, len(lines))
    text = "\n".join(lines[:at] + [garbage] + lines[at:]) + "\n"
    try:
        loaded = yaml.safe_load(text)
        valid_yaml = True
    except yaml.YAMLError:
        valid_yaml = False
    assume(not valid_yaml or not isinstance(loaded, dict))
    _check_refused(text, "not valid YAML" if not valid_yaml else "mapping")


def test_yaml_that_would_build_python_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = yaml.safe_dump(_base(tmp_path / "run"), sort_keys=False)
    text = text.replace("seed: 0", f"seed: !!python/object/apply:os.system ['touch {marker}']")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, err = spo_in_process("train", str(path))
    assert code == 2 and "not valid YAML" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (["sampling", "temperature"], 1e-320, "sampling.temperature"),  # was: a pydantic traceback mid-iteration
        (["task"], {"kind": "gsm8k", "train_file": "TRAIN", "prompt_template": "{nope}"}, "task.prompt_template"),
        (["task"], {"kind": "gsm8k", "train_file": "TRAIN", "prompt_template": "{"}, "task.prompt_template"),
        (["run", "name"], "two\nlines", "run.name"),
    ],
    ids=["subnormal-temperature", "unknown-placeholder", "lone-brace", "newline-in-name"],
)
def test_values_that_failed_once_training_ran_are_refused_up_front(tmp_path, path, value, field):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q", "answer": "#### 1"}\n')
    if isinstance(value, dict):
        value = {k: str(train) if v == "TRAIN" else v for k, v in value.items()}
    _check_refused(_set(_base(Path("x")), path, value), field)


def test_eval_refuses_a_temperature_too_small_to_sample_with(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(tmp_path))
    code, err = spo_in_process("eval", str(recipe), "--temperature", "1e-320")
    assert code == 2, err  # was: exit 0 after sampling with logits divided by a subnormal
    assert "--temperature must be 0 (greedy) or at least 0.01" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ episode and data files


GOOD_EPISODE = {
    "id": "e0", "group_id": "g0", "prompt": "Q", "response": "A", "prompt_token_ids": [1], "response_token_ids": [2, 3],
    "response_logprobs": [-0.1, -0.2], "finish_reason": "stop", "reward": 1.0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps(GOOD_EPISODE) + "\n" + json.dumps(GOOD_EPISODE)[:40], ":2: not valid JSON"),  # truncated line
        (json.dumps({**GOOD_EPISODE, "reward": "high"}) + "\n", ":1: bad episode: reward"),  # wrong type
        (json.dumps({k: v for k, v in GOOD_EPISODE.items() if k != "prompt"}) + "\n", ":1: bad episode: prompt"),
        (json.dumps({**GOOD_EPISODE, "response_logprobs": [-0.1]}) + "\n", "response_logprobs has 1 entries for 2"),
        ("", "no episodes (the file is empty)"),
        ("\n\n", "no episodes (the file is empty)"),
        (json.dumps(GOOD_EPISODE) + "\n[1, 2]\n", ":2: bad episode"),
        (b'{"id": "\xff\xfe"}\n', ":1: not UTF-8 text (byte 0xff at column 9)"),
    ],
    ids=["truncated", "wrong-type", "missing-field", "misaligned", "empty", "blank", "not-an-object", "not-utf8"],
)
def test_bad_episode_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_base(tmp_path / "run")))
    code, err = spo_in_process("partition", str(recipe), "--in", str(path), "--out", str(tmp_path / "out.jsonl"))
    assert code == 2, err
    assert str(path) in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"question": "q", "answer": "#### 1"}\n{"question": "q", "ans', ":2: invalid JSON"),
        (b"", "no training problems"),
        (b'{"question": "q", "answer": "#### 1"}\n"just a string"\n', ":2: expected a JSON object"),
        (b'{"question": "caf\xe9", "answer": "#### 1"}\n', ":1: invalid JSON"),
        (b'{"question": "q", "answer": "no final answer"}\n', "has no '#### <answer>' line"),
    ],
    ids=["truncated", "empty", "wrong-type", "not-utf8", "missing-answer"],
)
def test_bad_data_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    data = _base(tmp_path / "run")
    data["task"] = {"kind": "gsm8k", "train_file": str(path)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, err = spo_in_process("train", str(recipe))
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- graders

ADVERSARIAL = [
    "",
    "9" * 100_000,
    "#### " + "9" * 5_000,
    "\\boxed{" + "9" * 20_000 + "}",
    "\\boxed{" + "\\frac{" * 2_000 + "1" + "}{2}" * 2_000 + "}",
    "\\boxed{" + "{" * 10_000,
    "$" + "\\sqrt{" * 500 + "2" + "}" * 500 + "$",
    "\\boxed{10^{10^{10^{10^{10}}}}}",
    "\\boxed{" + "x^" * 3_000 + "2}",
    "½ ∑ ∞ ℵ₀ 🙂 \u202e \x00 \ufffd \\boxed{७}",
    ("a " * 50_000)[:100_000],
    "#### 1\n" * 10_000,
]


def test_adversarial_responses_are_graded_in_bounded_time():
    from spo_cli.evaluate.benchmarks import grade_gsm8k_rule
    from spo_cli.tasks.math import MathGrader

    assert all(len(r) <= 100_000 for r in ADVERSARIAL)
    start = time.perf_counter()
    graded = grade_gsm8k_rule(ADVERSARIAL, ["7"] * len(ADVERSARIAL))
    assert time.perf_counter() - start < 5 and [g[0] for g in graded] == [0.0] * 11 + [-2.0]
    with MathGrader(timeout_s=1) as grader:  # math-verify's own limit 1 s per parse/compare; backstop 11 s per item
        start = time.perf_counter()
        scores = grader.grade(ADVERSARIAL, ["7"] * len(ADVERSARIAL))
        elapsed = time.perf_counter() - start
        assert scores == [0.0] * len(ADVERSARIAL)
        assert elapsed < len(ADVERSARIAL) * grader.backstop_s
        # The grader still works afterwards (a stuck or killed worker was replaced).
        assert grader.grade(["\\boxed{7}"], ["7"]) == [1.0]
    print(f"{len(ADVERSARIAL)} adversarial responses graded in {elapsed:.1f} s")
