"""Hostile recipe files and overrides: each ends in one clear SpoUserError (exit 2) naming the file and, where it
can, the field and line; never a traceback, a hang, gigabytes of memory or output, or a silently wrong run."""

from __future__ import annotations

import math
import resource
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml
from pydantic import ValidationError

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Section, load_recipe, parse_recipe

from ..conftest import REPO, spo_in_process, tiny_recipe_dict


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


SECTIONS = sorted(set(_subclasses(Section)), key=lambda c: c.__name__)  # every model of the recipe


def _recipe(tmp_path: Path, text: str | None = None, name: str = "recipe.yaml") -> Path:
    """A valid tiny recipe (or `text`) written to tmp_path/name."""
    path = tmp_path / name
    path.write_text(text if text is not None else yaml.safe_dump(tiny_recipe_dict(tmp_path), sort_keys=False))
    return path


def _line(path: Path, start: str) -> int:
    """1-based number of the first line of `path` that starts with `start`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(start))


def _refused(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpoUserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def _spo(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in its own process."""
    return subprocess.run([sys.executable, "-m", "spo_cli", *args], cwd=REPO, capture_output=True, text=True, **kwargs)



# ------------------------------------------------------------------------------------- files that are not recipes


def test_binary_file_directory_and_huge_integer_exit_2_with_one_line_each(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    big = _recipe(tmp_path, name="big.yaml")
    big.write_text(big.read_text().replace("seed: 0", "seed: " + "1" * 5000))
    seed_line = _line(big, "  seed:")
    assert _refused(binary) == f"{binary}: not a text (UTF-8) file (byte 0x89 at offset 0)"
    assert _refused(folder) == f"{folder}: is a directory, not a recipe file"
    assert _refused(big) == (
        f"{big}:{seed_line}: run.seed: an integer of 5000 characters is out of range of every recipe field"
    )
    out = _spo("recipe", "check", str(binary), str(folder), str(big), timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: {binary}: not a text (UTF-8) file (byte 0x89 at offset 0)",
        f"error: {folder}: is a directory, not a recipe file",
        f"error: {big}:{seed_line}: run.seed: an integer of 5000 characters is out of range of every recipe field",
    ]


def test_huge_integers_from_overrides_and_python_are_clear_errors(tmp_path):
    path = _recipe(tmp_path)
    digits = "1" * 5000
    assert _refused(path, [f"run.seed={digits}"]) == (  # the quote of the override is cut in its middle
        f"override 'run.seed={'1' * 88}...{'1' * 98}': an integer of 5000 characters is out of range of every "
        "recipe field"
    )
    data = tiny_recipe_dict(tmp_path)
    data["run"]["seed"] = 10**5000  # str() of it would raise ValueError (over 4300 digits)
    with pytest.raises(SpoUserError) as info:
        parse_recipe(data)
    assert "  run.seed: Input should be less than or equal to 4294967295 (got <an integer of 16610 bits>)" in str(
        info.value
    )


def test_a_file_over_1_mb_is_refused_before_parsing(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text() + "# " + "x" * 1_000_000 + "\n")
    assert _refused(path) == f"{path}: over 1 MB: too big for a recipe (one is a few KB)"


def test_control_characters_name_the_line(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("seed: 0", "seed: 0\x00"))
    assert _refused(path) == f"{path}:{_line(path, '  seed:')}: not valid YAML: control character #x0000"


# ------------------------------------------------------------------------------------------ non-finite numbers


def _float_fields() -> list[tuple[type, str]]:
    fields = []
    for section in SECTIONS:
        for name, info in section.model_fields.items():
            if info.annotation is float or float in typing.get_args(info.annotation):
                fields.append((section, name))
    return fields


FLOAT_FIELDS = _float_fields()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_every_float_field_refuses_non_finite_numbers(value):
    assert len(FLOAT_FIELDS) > 40  # every section's, found through Section's subclasses
    for section, name in FLOAT_FIELDS:
        with pytest.raises(ValidationError) as info:
            section.model_validate({name: value})
        types = {err["type"] for err in info.value.errors() if err["loc"] == (name,)}
        assert types == {"finite_number"}, (section.__name__, name, info.value.errors())


def test_non_finite_numbers_in_a_file_name_field_and_line(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("learning_rate: 0.0001", "learning_rate: .inf"))
    line = _line(path, "  learning_rate: .inf")
    assert _refused(path) == (
        f"{path}: invalid recipe (1 problem)\n"
        f"  optim.learning_rate (line {line}): Input should be a finite number (got inf)"
    )


def test_non_finite_overrides_exit_2_on_the_command_line(tmp_path):
    path = _recipe(tmp_path)
    learning_rate, sampling = _line(path, "  learning_rate:"), _line(path, "sampling:")  # no temperature there
    out = _spo("recipe", "show", str(path), "optim.learning_rate=.inf", "sampling.temperature=-.inf", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        f"error: {path}: invalid recipe (2 problems)\n"
        f"  sampling.temperature (line {sampling}): Input should be a finite number (got -inf)\n"
        f"  optim.learning_rate (line {learning_rate}): Input should be a finite number (got inf)\n"
    )
    code, err = spo_in_process("recipe", "show", str(path), "eval.temperature=.nan")
    assert code == 2 and "eval.temperature" in err and "Input should be a finite number (got nan)" in err


# --------------------------------------------------------------------------------------------- integer ranges


def _bounded(metadata: list) -> bool:
    return any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata)


def _int_items(annotation) -> list[list]:
    """The constraints of every int inside a field's type (the field itself, an Optional's, a list's items)."""
    if annotation is int:
        return [[]]
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return [[m for e in extra for m in getattr(e, "metadata", [e])] + inner for inner in _int_items(base)]
    return [inner for arg in typing.get_args(annotation) for inner in _int_items(arg)]


def test_every_integer_field_has_an_upper_bound():
    unbounded = []
    for section in SECTIONS:
        for name, info in section.model_fields.items():
            for inner in _int_items(info.annotation):
                if not _bounded(list(info.metadata) + inner):
                    unbounded.append(f"{section.__name__}.{name}")
    assert not unbounded


def test_run_seed_is_bounded_by_what_numpy_seeding_takes(tmp_path):
    path = _recipe(tmp_path)
    assert load_recipe(path, [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1
    assert _refused(path, ["run.seed=100000000000000000000000"]) == (
        f"{path}: invalid recipe (1 problem)\n"
        f"  run.seed (line {_line(path, '  seed:')}): Input should be less than or equal to 4294967295 "
        "(got 100000000000000000000000)"
    )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("task.eval_steps=[2, 1000000000]", "task.eval_steps.1"),  # make_problem loops once per step
        ("task.max_val=1" + "0" * 30, "task.max_val"),  # printed into prompts
        ("sampling.max_completion_length=1" + "0" * 30, "sampling.max_completion_length"),
        ("model.init_seed=-1", "model.init_seed"),
        ("hardware.num_threads=1" + "0" * 20, "hardware.num_threads"),
        ("eval.eval_every_s=5e-324", "eval.eval_every_s"),  # used / 5e-324 is inf
    ],
)
def test_integer_and_float_ranges_name_the_field(tmp_path, override, field):
    assert f"  {field} (line " in _refused(_recipe(tmp_path), [override])


def test_a_tree_of_over_a_million_leaves_is_refused(tmp_path):
    message = _refused(_recipe(tmp_path), ["estimator.kind=mc_tree", "estimator.branching=[1024, 1024, 2]",
                                           "train.episodes_per_iteration=8", "sampling.num_generations=1"])  # fmt: skip
    assert message.endswith("\n  estimator: branching [1024, 1024, 2] gives over 1048576 leaves per tree")


# ------------------------------------------------------------------------------------- aliases and big inputs

BOMB = "".join(
    [f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9)}]\n" for i in range(1, 10)]
)  # a billion laughs: j expands to 9**10 strings


def test_alias_bomb_is_refused_in_bounded_time_memory_and_output(tmp_path):
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB
    path = _recipe(tmp_path)
    path.write_text(text + path.read_text().replace("name: test", "name: *j"))
    assert len(path.read_bytes()) < 2_000
    expected = f"{path}:5: e.0: more than 10000 YAML nodes with aliases expanded (a recipe has a few hundred)"

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    # In a bounded process first: unbounded, the alias expansion took 108 s, 11 GB and printed 2.1 GB.
    out = _spo("recipe", "check", str(path), timeout=20, preexec_fn=limits)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == f"error: {expected}\n" and len(out.stdout) + len(out.stderr) < 4_000
    assert _refused(path) == expected


def test_aliases_that_repeat_a_long_string_or_contain_themselves_are_refused(tmp_path):
    path = _recipe(tmp_path)
    stop = "  stop: &s ['" + "x" * 200_000 + "']\n"
    path.write_text(path.read_text().replace("sampling:\n", "sampling:\n" + stop + "  extra: [*s, *s, *s, *s, *s]\n"))
    extra = _line(path, "  extra:")
    expected = f"{path}:{extra}: sampling.extra.3: aliases expand the recipe's text past 1000000 characters"
    assert _refused(path) == expected
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("name: test", "name: &n [1, *n]"))
    assert _refused(path) == f"{path}:{_line(path, '  name:')}: run.name.1: alias *n refers to a node that contains it"


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text() + "optim:\n  learning_rate: 1.0\n")
    first, second = _line(path, "optim:"), len(path.read_text().splitlines()) - 1
    assert _refused(path) == f"{path}:{second}: not valid YAML: duplicate key optim (first at line {first})"
    path = _recipe(tmp_path)
    path.write_text(path.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n")  # PyYAML recursion
    message = _refused(path)
    assert message.startswith(f"{path}:{_line(path, 'extra:')}: extra.0.0.0.") and message.endswith(
        "...: nested more than 100 levels deep"
    )


def test_messages_quote_bounded_excerpts_of_the_input(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    laughs: list = ["lol"] * 9
    for _ in range(6):
        laughs = [laughs] * 9  # 9**7 strings, 33 MB printed in full
    data["run"]["name"] = laughs
    data["model"]["arch"] = "x" * 1_000_000
    data["task"]["eval_steps"] = ["x"] * 5_000
    with pytest.raises(SpoUserError) as info:
        parse_recipe(data)
    lines = str(info.value).splitlines()
    assert lines[0] == "<recipe>: invalid recipe (5002 problems)" and lines[-1] == "  ... and 4982 more"
    assert len(lines) == 22 and all(len(line) < 400 for line in lines), lines
    assert "  run.name: Input should be a valid string (got [[[[...], [...], [...], [...], [...], [...]," in lines[1]
    assert lines[2] == f"  model.arch: Input should be 'qwen2' or 'llama' (got '{'x' * 97}...{'x' * 98}')"


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("task={kind: gsm8k, train_file: " + "a" * 300 + "}", "  task.train_file (line {}): cannot use the path a"),
        ("model={kind: pretrained, name_or_path: ~no-such-user-spo/m}", "  model.name_or_path (line {}): cannot use "
         "the path ~no-such-user-spo/m: Could not determine home directory."),
    ],
    ids=["name-too-long", "unknown-user"],
)
def test_unusable_paths_name_the_field_not_a_traceback(tmp_path, override, problem):
    path = _recipe(tmp_path)
    section = override.partition("=")[0]
    message = _refused(path, [override])
    assert problem.format(_line(path, f"{section}:")) in message and len(message) < 600
    assert message.endswith("...: File name too long" if "a" * 300 in override else "directory.")


# --------------------------------------------------------------------------------------------------- run.name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../../x", "'../../x' is a path, not a name"),
        ("a/b", "'a/b' is a path, not a name"),
        ("a\\b", "'a\\\\b' is a path, not a name"),
        ("..", "'..' is a path, not a name"),
        (".", "'.' is a path, not a name"),
        ("/tmp/x", "'/tmp/x' is an absolute path, and run.name is a name"),
    ],
)
def test_run_name_is_a_name_not_a_path(tmp_path, name, problem):
    path = _recipe(tmp_path)
    message = _refused(path, [f"run.name={name}"])
    tail = " (no '/', '\\', '.' or '..')" if "absolute" not in problem else ""
    assert message == (
        f"{path}: invalid recipe (1 problem)\n"
        f"  run.name (line {_line(path, '  name:')}): {problem}{tail}: set run.output_dir to choose where the run is "
        "written"
    )


def test_a_plain_run_name_still_names_the_default_folder(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    del data["run"]["output_dir"]
    data["run"]["name"] = "grpo-seed_1.v2"
    assert parse_recipe(data).run.run_dir == Path("runs/grpo-seed_1.v2")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ('"a\\nb"', "'a\\nb' contains a control character ('\\n')"),
        ('"a\\tb"', "'a\\tb' contains a control character ('\\t')"),
        ('"\\e[31mred"', "'\\x1b[31mred' contains a control character ('\\x1b')"),
        ("'   '", "'   ' is blank"),
    ],
    ids=["newline", "tab", "escape-code", "spaces"],
)
def test_run_name_is_printable_and_not_blank(tmp_path, name, problem):
    path = _recipe(tmp_path)
    message = _refused(path, [f"run.name={name}"])
    line = _line(path, "  name:")
    assert message.startswith(f"{path}: invalid recipe (1 problem)\n  run.name (line {line}): {problem}"), message


# ----------------------------------------------------------------------------- numbers too small to compute with


@pytest.mark.parametrize(
    ("override", "bound"),
    [
        ("sampling.temperature=1e-320", "0.01"),  # logits / 1e-320 are inf: NaN log-probs, a traceback mid-run
        ("eval.temperature=0.001", "0.01"),  # vLLM would sample at 0.01 instead
        ("optim.adam_epsilon=1e-320", "1e-30"),  # 0 in float32: AdamW's 0 / 0 makes NaN weights
    ],
)
def test_numbers_too_small_to_compute_with_name_the_field(tmp_path, override, bound):
    path = _recipe(tmp_path)
    field = override.partition("=")[0]
    section = field.partition(".")[0]  # the tiny recipe sets none of these fields: the line is its section's
    assert f"  {field} (line {_line(path, section + ':')}): Input should be greater than or equal to {bound}" in (
        _refused(path, [override])
    )


# ---------------------------------------------------------------------------------------------- prompt templates


@pytest.mark.parametrize(
    ("kind", "template", "problem"),
    [
        ("gsm8k", "{nope}", "unknown placeholder {nope}: the gsm8k task fills only {question}"),
        ("gsm8k", "Q: {question.upper}", "unknown placeholder {question.upper}: the gsm8k task fills only {question}"),
        ("gsm8k", "{0} {question}", "unknown placeholder {0}: the gsm8k task fills only {question}"),
        ("gsm8k", "{", "not a format string: Single '{' encountered in format string"),
        ("gsm8k", "{question} }", "not a format string: Single '}' encountered in format string"),
        ("gsm8k", "{question:d}", "cannot be filled: Unknown format code 'd' for object of type 'str'"),
        ("gsm8k", "{question:{width}}", "a placeholder inside a format spec: the gsm8k task fills only {question}"),
        ("math", "{question}", "unknown placeholder {question}: the math task fills only {problem}"),
        ("math", "Solve it.", "has no {problem} placeholder: every prompt would be the same text"),
    ],
)
def test_prompt_templates_are_checked_with_the_recipe(tmp_path, kind, template, problem):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q", "answer": "#### 1"}\n')
    data = tiny_recipe_dict(tmp_path)
    data["task"] = {"kind": kind, "train_file": str(train), "prompt_template": template}
    path = _recipe(tmp_path, yaml.safe_dump(data, sort_keys=False))
    message = _refused(path)
    assert f"  task.prompt_template (line {_line(path, '  prompt_template:')}): {problem}" in message, message


def test_templates_with_literal_braces_and_format_specs_are_accepted(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q", "answer": "#### 1"}\n')
    data = tiny_recipe_dict(tmp_path)
    data["task"] = {"kind": "math", "train_file": str(train), "prompt_template": "\\boxed{{x}} {problem!s:>3}"}
    assert load_recipe(_recipe(tmp_path, yaml.safe_dump(data))).task.prompt_template == "\\boxed{{x}} {problem!s:>3}"
