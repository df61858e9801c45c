import json

import pytest

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
    with pytest.raises(json.JSONDecodeError):
        read_records(path)
    truncate_records(tmp_path / "absent.jsonl", 3)
    assert read_records(tmp_path / "absent.jsonl") == []
