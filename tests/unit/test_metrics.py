import json
import re

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.metrics import MetricsLog, read_records, truncate_records


def test_torn_last_line_is_dropped_and_resume_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "reward": i / 10}) + "\n" for i in range(1, 5)) + '{"iterat')
    assert [r["iteration"] for r in read_records(path)] == [1, 2, 3, 4]
    MetricsLog(tmp_path, [], resume_iteration=2).log({"iteration": 3, "reward": 0.5})
    assert read_records(path) == [{"iteration": 1, "reward": 0.1}, {"iteration": 2, "reward": 0.2}, {"iteration": 3, "reward": 0.5}]


def test_a_torn_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1}\n{"itera\n{"iteration": 2}\n')
    with pytest.raises(SpoUserError, match=re.escape(f"{path}:2: not valid JSON (Unterminated string")):
        read_records(path)
    truncate_records(tmp_path / "absent.jsonl", 3)
    assert read_records(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('garbage{\n{"iteration": 1}\n', ":1: not valid JSON (Expecting value)"),
        ('{"iteration": 1}\n[1, 2]\n', ":2: not a record (a JSON list, not an object)"),
        ('{"iteration": "one"}\n', ":1: iteration is 'one', not an iteration number"),
        ('{"iteration": 1}\ngarbage\n', ":2: not valid JSON (Expecting value)"),  # a whole line: not torn by a kill
        (b'{"iteration": 1}\n{"x": "\xff"}\n', ":2: not UTF-8 text"),
    ],
    ids=["garbage-first-line", "not-an-object", "iteration-not-a-number", "garbage-last-line", "not-utf8"],
)
def test_a_damaged_log_names_file_and_line_and_how_to_fix_it(tmp_path, text, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpoUserError) as info:
        truncate_records(path, 1)  # what --resume does first (was: JSONDecodeError, AttributeError, TypeError)
    assert str(info.value).startswith(f"{path}{problem}") and "delete the line" in str(info.value)
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())
