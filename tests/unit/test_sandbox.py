"""The local sandbox's limits, each provoked by the code a model might write: every call ends in a ToolResult
whose output tells the model what happened, and leaves nothing behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

LIMITS = SandboxLimits(wall_seconds=3.0, cpu_seconds=1.0, memory_mb=256, output_bytes=2000, disk_mb=4, open_files=32)


@pytest.fixture(scope="module")
def sandbox() -> LocalSandbox:
    return LocalSandbox(LIMITS, workers=2)


@pytest.fixture(scope="module")
def isolated(sandbox) -> LocalSandbox:
    if not sandbox.isolate:
        pytest.skip(f"no namespaces on this machine: {sandbox.isolation}")
    return sandbox


def test_the_output_of_a_program_comes_back(sandbox):
    result = sandbox.run("x = 6 * 7\nprint(x)\nprint('to stderr', file=__import__('sys').stderr)")
    assert (result.status, result.output) == ("ok", "42\nto stderr\n")


def test_an_exception_is_the_models_traceback(sandbox):
    result = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    # The same text whatever temporary directory the call ran in: episodes stay reproducible.
    assert 'File "/sandbox/main.py", line 2, in f' in result.output
    assert result.output.rstrip().endswith("ZeroDivisionError: division by zero")


def test_an_endless_sleep_is_stopped_at_the_wall_clock_limit(sandbox):
    result = sandbox.run("import time\ntime.sleep(60)")
    assert result.status == "timeout" and "wall-clock" in result.output
    assert LIMITS.wall_seconds <= result.seconds < LIMITS.wall_seconds + 3


def test_an_endless_loop_is_stopped_at_the_cpu_limit(sandbox):
    result = sandbox.run("while True:\n    pass")
    assert result.status == "timeout" and "CPU time" in result.output


def test_memory_beyond_the_limit_is_a_memory_error(sandbox):
    result = sandbox.run("block = bytearray(1 << 30)")
    assert result.status == "error" and "MemoryError" in result.output


def test_a_gigabyte_of_output_is_cut_and_the_program_stopped(sandbox):
    result = sandbox.run("line = 'x' * 999\nfor _ in range(1_000_000):\n    print(line)")
    assert result.status == "output_limit", "stopped by the flood of output, not at the time limits"
    assert len(result.output.encode()) < LIMITS.output_bytes + 200
    assert "bytes of output cut" in result.output and "printed more than 32000 bytes and was stopped" in result.output


def test_long_output_keeps_its_head_and_its_tail(sandbox):
    result = sandbox.run("print('start')\nfor i in range(1000):\n    print(i)\nraise ValueError('the last line')")
    assert result.status == "error", "the program ended by itself: only its output was cut"
    assert result.output.startswith("start\n0\n1\n") and "bytes of output cut" in result.output
    assert result.output.rstrip().endswith("ValueError: the last line")
    assert len(result.output.encode()) < LIMITS.output_bytes + 100


def test_a_crash_by_signal_is_reported(sandbox):
    result = sandbox.run("import os\nos.abort()")
    assert result.status == "error" and "SIGABRT" in result.output


def test_too_many_open_files_fail_inside_the_program(sandbox):
    result = sandbox.run("files = [open(f'f{i}', 'w') for i in range(100)]")
    assert result.status == "error" and "Too many open files" in result.output


def test_no_environment_variable_leaks_in(sandbox, monkeypatch):
    monkeypatch.setenv("SPO_SECRET_TOKEN", "hunter2")
    result = sandbox.run("import os\nprint(sorted(os.environ))")
    assert result.status == "ok" and "SPO_SECRET_TOKEN" not in result.output and "hunter2" not in result.output
    assert eval(result.output) == ["HOME", "LANG", "PATH"]


def test_each_call_gets_a_fresh_working_directory(sandbox):
    first = sandbox.run("open('note.txt', 'w').write('kept?')\nimport os\nprint(os.listdir('.'))")
    second = sandbox.run("import os\nprint(sorted(os.listdir('.')))")
    assert first.status == second.status == "ok"
    assert "note.txt" in first.output and second.output.strip() == "['main.py']"


def test_calls_run_in_parallel_and_keep_their_order(sandbox):
    code = "import time\nstart = time.time()\ntime.sleep(1)\nprint({i}, start, time.time())"
    results = sandbox.run_many([code.format(i=i) for i in range(4)])
    rows = [r.output.split() for r in results]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    intervals = sorted((float(row[1]), float(row[2])) for row in rows)
    overlapping = sum(1 for a, b in zip(intervals, intervals[1:]) if b[0] < a[1])
    assert overlapping >= 1, "two workers run two calls at once"


def test_no_network(isolated):
    code = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\nexcept OSError as e:\n    print(e)"
    result = isolated.run(code)
    assert result.status == "ok" and "unreachable" in result.output.lower()


def test_no_writes_outside_the_working_directory(isolated, tmp_path):
    target = tmp_path / "escaped.txt"
    result = isolated.run(f"open({str(target)!r}, 'w').write('x')")
    assert result.status == "error" and "Read-only file system" in result.output
    assert not target.exists()


def test_the_working_directory_is_small(isolated):
    result = isolated.run("open('big', 'wb').write(b'x' * (64 << 20))")
    assert result.status == "error", result.output


def test_a_fork_bomb_neither_stalls_the_run_nor_outlives_the_call(isolated):
    result = isolated.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout" and result.seconds < LIMITS.wall_seconds + 3
    time.sleep(0.2)
    assert _sandboxed_programs() == [], "every process of the call is gone"


def test_the_code_cannot_undo_the_read_only_mounts(isolated):
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"  # MS_REMOUNT | MS_BIND: rw
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))])"
    )
    result = isolated.run(code)
    assert result.status == "ok", result.output
    mount_line, caps_line = result.output.splitlines()
    assert mount_line == "-1 1"  # EPERM
    assert caps_line == "['0000000000000000', '0000000000000000']"


def test_it_says_how_it_is_isolated(sandbox):
    assert ("namespaces" in sandbox.isolation) and (sandbox.isolate == ("NO namespaces" not in sandbox.isolation))


def _sandboxed_programs() -> list[int]:
    """Processes running a sandboxed program (`python -I -u -B main.py`); only this module's tests start them."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().endswith(b"\0-I\0-u\0-B\0main.py\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found
