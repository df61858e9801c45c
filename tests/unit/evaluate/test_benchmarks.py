"""Which problems `spo eval` loads, how it prompts them and which grader it picks, and its data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.evaluate.benchmarks import build_eval_sets, grade_gsm8k_rule, parse_dataset_names
from spo_cli.recipe import parse_recipe

from ...conftest import DATA, TINY_RECIPE, tiny_recipe_dict


def _recipe(tmp_path: Path, task: dict | None = None):
    data = tiny_recipe_dict(tmp_path)
    if task is not None:
        data["task"] = task
    return parse_recipe(data)


def test_parse_dataset_names():
    assert parse_dataset_names("task, math500,aime24") == [("task", None), ("math500", None), ("aime24", None)]
    assert parse_dataset_names("gsm8k=my/file.jsonl,gsm8k=my/file.jsonl") == [("gsm8k", Path("my/file.jsonl"))]
    with pytest.raises(SpoUserError, match="unknown dataset 'mmlu'.*known: task, gsm8k, math500, aime24, math"):
        parse_dataset_names("math500,mmlu")
    with pytest.raises(SpoUserError, match="takes no file"):
        parse_dataset_names("task=x.jsonl")
    with pytest.raises(SpoUserError, match="no dataset"):
        parse_dataset_names(" , ")


def test_benchmarks_from_the_data_directory(tmp_path):
    recipe = _recipe(tmp_path)
    sets = build_eval_sets(recipe, parse_dataset_names("task,math500,aime24,gsm8k"), DATA, max_problems=20)
    try:
        task, math500, aime24, gsm8k = sets
        assert task.name == "task-arith" and len(task.problems) == 8  # eval_steps [1, 2] x eval_per_step 4
        assert len(math500.problems) == 20 and math500.problems[0].id == "test/precalculus/807.json"
        assert math500.problems[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
        assert len(aime24.problems) == 20 and aime24.problems[0].gold == "204"
        assert gsm8k.problems[0].gold == "18"
        # The arith model is prompted as it was trained (the bare question, in its chat template) ...
        assert math500.format_prompt("What is 1+1?") == "What is 1+1?" and math500.use_chat_template
        # ... and GSM8K is graded with the "####" rule it answers in, MATH-style sets with math-verify.
        assert gsm8k.grade is grade_gsm8k_rule
        assert math500.grade is not grade_gsm8k_rule
    finally:
        for s in sets:
            s.close()


def test_a_math_recipe_prompts_with_its_template_and_grades_gsm8k_with_math_verify(tmp_path):
    recipe = _recipe(
        tmp_path,
        task={"kind": "math", "train_file": str(DATA / "math" / "train.jsonl"), "prompt_template": "Q: {problem}\nA:",
              "use_chat_template": False},
    )  # fmt: skip
    (gsm8k,) = build_eval_sets(recipe, parse_dataset_names("gsm8k"), DATA, max_problems=2)
    try:
        assert gsm8k.format_prompt("2+2?") == "Q: 2+2?\nA:"
        assert gsm8k.grade is not grade_gsm8k_rule
        assert [g[0] for g in gsm8k.grade(["\\boxed{18}", "#### 18"], ["18", "18"])] == [1.0, 1.0]
    finally:
        gsm8k.close()


def test_a_local_file_and_its_errors(tmp_path):
    recipe = _recipe(tmp_path)
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    (s,) = build_eval_sets(recipe, parse_dataset_names(f"math500={good}"), None, None)
    s.close()
    assert [p.gold for p in s.problems] == ["2"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + '{"problem": \n')
    with pytest.raises(SpoUserError, match=r"bad.jsonl:2: invalid JSON"):
        build_eval_sets(recipe, parse_dataset_names(f"math500={bad}"), None, None)
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(SpoUserError, match=r"nofield.jsonl: record 1 has no field 'problem' \(it has: question\)"):
        build_eval_sets(recipe, parse_dataset_names(f"math500={missing_field}"), None, None)
    with pytest.raises(SpoUserError, match=r"gsm8k: .*no-such-dir/gsm8k/test.jsonl does not exist"):
        build_eval_sets(recipe, parse_dataset_names("gsm8k"), tmp_path / "no-such-dir", None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SpoUserError, match="has no problems"):
        build_eval_sets(recipe, parse_dataset_names(f"aime24={empty}"), None, None)


def test_without_a_data_directory_offline_the_hub_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("SPO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = _recipe(tmp_path)
    with pytest.raises(SpoUserError, match=r"HuggingFaceH4/MATH-500.*--data-dir"):
        build_eval_sets(recipe, parse_dataset_names("math500"), None, None)
    monkeypatch.setenv("SPO_DATA_DIR", str(DATA))
    (s,) = build_eval_sets(recipe, parse_dataset_names("aime24"), None, None)
    s.close()
    assert len(s.problems) == 30


def test_task_set_needs_held_out_problems(tmp_path):
    recipe = _recipe(tmp_path, task={"kind": "gsm8k", "train_file": str(DATA / "gsm8k" / "train.jsonl")})
    assert "test_file" not in TINY_RECIPE["task"]
    with pytest.raises(SpoUserError, match="has no held-out problems"):
        build_eval_sets(recipe, parse_dataset_names("task"), None, None)
