"""The local sandbox's limits, each provoked by the code a model might write, in both modes: jailed (nsjail) and
unisolated (the recipe's allow_unisolated). Every call ends in a ToolResult whose output tells the model what
happened, and leaves nothing behind: the host-side checks look at the host's processes and files.
tests/unit/test_sandbox_escape.py holds the programs written to get out of the jail."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spo_cli.tools import jail
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits, SandboxUnavailable

LIMITS = SandboxLimits(wall_seconds=3.0, cpu_seconds=1.0, memory_mb=256, output_bytes=2000, disk_mb=4, open_files=32)
# Unisolated as root, the code runs as an unprivileged uid, which cannot read a Python under /root (this machine's):
# the system's Python serves there.
SYSTEM_PYTHON = "/usr/bin/python3"


def unisolated_sandbox(**kwargs) -> LocalSandbox:
    python = None
    if os.geteuid() == 0:
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            pytest.skip(f"unisolated as root needs a Python every uid can read; {SYSTEM_PYTHON} is missing")
        python = SYSTEM_PYTHON
    return LocalSandbox(LIMITS, python=python, allow_unisolated=True, try_jail=False, **kwargs)


def jailed_sandbox(**kwargs) -> LocalSandbox:
    try:
        return LocalSandbox(LIMITS, **kwargs)
    except SandboxUnavailable as exc:
        pytest.skip(f"no jail on this machine: {exc}")


@pytest.fixture(scope="module", params=["jail", "unisolated"])
def sandbox(request) -> LocalSandbox:
    with (jailed_sandbox if request.param == "jail" else unisolated_sandbox)(workers=2) as box:
        yield box


@pytest.fixture(scope="module")
def isolated() -> LocalSandbox:
    with jailed_sandbox(workers=2) as box:
        yield box


def test_the_output_of_a_program_comes_back(sandbox):
    result = sandbox.run("x = 6 * 7\nprint(x)\nprint('to stderr', file=__import__('sys').stderr)")
    assert (result.status, result.output) == ("ok", "42\nto stderr\n")


def test_an_exception_is_the_models_traceback(sandbox):
    result = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    # The same text whatever temporary directory the call ran in, and nothing of the worker: episodes stay
    # reproducible and the model sees only its own program.
    assert result.output.startswith('Traceback (most recent call last):\n  File "/sandbox/main.py", line 3')
    assert 'File "/sandbox/main.py", line 2, in f' in result.output
    assert result.output.rstrip().endswith("ZeroDivisionError: division by zero")


def test_a_syntax_error_is_shown_as_python_shows_it(sandbox):
    result = sandbox.run("x = (")
    assert result.status == "error"
    assert result.output.startswith('  File "/sandbox/main.py", line 1\n') and "SyntaxError" in result.output


def test_exit_codes_and_exit_messages(sandbox):
    assert [sandbox.run(code).status for code in ("import sys; sys.exit(0)", "import sys; sys.exit(3)")] == [
        "ok", "error"]  # fmt: skip
    assert sandbox.run("import sys; sys.exit('bye')").output == "bye\n"


def test_threads_are_joined_and_exit_handlers_run(sandbox):
    code = (
        "import atexit, threading, time\natexit.register(print, 'atexit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main')"
    )
    assert sandbox.run(code).output == "main\nthread\natexit\n"


def test_an_endless_sleep_is_stopped_at_the_wall_clock_limit(sandbox):
    result = sandbox.run("import time\ntime.sleep(60)")
    assert result.status == "timeout" and "wall-clock" in result.output
    assert LIMITS.wall_seconds <= result.seconds < LIMITS.wall_seconds + 3


def test_closing_its_output_does_not_escape_the_wall_clock_limit(sandbox):
    result = sandbox.run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    assert result.status == "timeout" and result.seconds < LIMITS.wall_seconds + 3
    assert sandbox.call_processes() == [], "the sleeper was killed"


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


def test_the_parents_secrets_are_not_readable_through_proc(sandbox, monkeypatch):
    """The worker and spo itself: /proc/<pid>/environ holds the environment a process started with."""
    code = (
        "import os\nfor pid in (os.getppid(), {spo}):\n    try:\n        print(open(f'/proc/{{pid}}/environ').read())\n"
        "    except OSError as e:\n        print(type(e).__name__)"
    ).format(spo=os.getpid())
    result = sandbox.run(code)
    assert result.status == "ok", result.output
    assert "PATH=" not in result.output and "HF_" not in result.output and "SPO_" not in result.output
    assert all(line in ("PermissionError", "FileNotFoundError") for line in result.output.split())


def test_the_call_does_not_run_as_root(sandbox):
    result = sandbox.run("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())")
    uid, euid, gid, groups = result.output.split(maxsplit=3)
    assert (uid, euid, gid) != ("0", "0", "0") and "0" not in (uid, euid, gid)
    assert groups.strip() in ("[]", f"[{gid}]")


def test_each_call_gets_a_fresh_working_directory(sandbox):
    first = sandbox.run("open('note.txt', 'w').write('kept?')\nimport os\nos.mkdir('d')\nos.chmod('d', 0)\nprint(os.listdir('.'))")
    second = sandbox.run("import os\nprint(sorted(os.listdir('.')))")
    assert first.status == second.status == "ok"
    assert "note.txt" in first.output and second.output.strip() == "['.shm', 'main.py']"


def test_a_setsid_daemon_does_not_outlive_its_call(sandbox):
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n"
        "    os._exit(0)\nprint('left a daemon')"
    )
    result = sandbox.run(code)
    assert (result.status, result.output) == ("ok", "left a daemon\n")
    assert sandbox.call_processes() == [], "the daemon was killed before the next call"


def test_a_fork_bomb_neither_stalls_the_run_nor_outlives_the_call(sandbox):
    result = sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout" and result.seconds < LIMITS.wall_seconds + 3
    assert sandbox.call_processes() == [], "every process of the call is gone"


def test_calls_run_in_parallel_and_keep_their_order(sandbox):
    code = "import time\nstart = time.time()\ntime.sleep(1)\nprint({i}, start, time.time())"
    results = sandbox.run_many([code.format(i=i) for i in range(4)])
    rows = [r.output.split() for r in results]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    intervals = sorted((float(row[1]), float(row[2])) for row in rows)
    overlapping = sum(1 for a, b in zip(intervals, intervals[1:]) if b[0] < a[1])
    assert overlapping >= 1, "two workers run two calls at once"


def test_a_stopped_worker_is_replaced(sandbox):
    assert sandbox.run("import time\ntime.sleep(60)").status == "timeout"  # its worker was killed
    assert sandbox.run("print('next')").output == "next\n"


def test_it_says_how_it_is_isolated(sandbox):
    assert ("nsjail" in sandbox.isolation) == sandbox.isolated
    assert ("NO ISOLATION" in sandbox.isolation) == (not sandbox.isolated)


def test_unisolated_is_refused_unless_the_recipe_allows_it(monkeypatch):
    monkeypatch.setattr(jail, "find_nsjail", lambda: None)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated: true") as refused:
        LocalSandbox(LIMITS)
    assert "nsjail is not installed" in str(refused.value)


def test_a_jail_that_cannot_start_is_refused_with_nsjails_words(monkeypatch, tmp_path):
    broken = tmp_path / "nsjail"
    broken.write_text("#!/bin/sh\necho 'clone(CLONE_NEWUSER) failed: Operation not permitted' >&2\nexit 255\n")
    broken.chmod(0o755)
    monkeypatch.setattr(jail, "find_nsjail", lambda: str(broken))
    with pytest.raises(SandboxUnavailable, match="CLONE_NEWUSER"):
        LocalSandbox(LIMITS)


def test_the_unisolated_workers_leave_no_directory_behind():
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("spo-sandbox-*"))
    box = unisolated_sandbox(workers=2)
    box.run_many(["print(1)", "import time\ntime.sleep(60)"])  # the second one's worker is killed
    box.close()
    time.sleep(0.2)
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("spo-sandbox-*")) <= before


def test_a_worker_that_cannot_start_frees_its_place(monkeypatch):
    box = unisolated_sandbox(workers=1)
    box.run("import time\ntime.sleep(60)")  # its only worker is killed: the next call starts one
    monkeypatch.setattr(box._launcher, "start", lambda: (_ for _ in ()).throw(OSError(24, "Too many open files")))
    with pytest.raises(OSError):
        box.run("print(1)")
    monkeypatch.undo()
    assert box.run("print('again')").output == "again\n", "the pool did not wait for a worker that never started"
    box.close()
