"""Running model-written Python where it can do no harm (docs/tools.md#the-local-sandbox).

Every call is a fresh process tree: `unshare` gives it its own user, mount, PID and network namespaces, where
`sandbox_child.py` makes every mount read-only, mounts a size-limited tmpfs as the working directory, drops every
capability and sets the CPU-time, memory, file-size and open-file limits before it execs the code. The network
namespace has no interface but a down loopback; the environment holds PATH, HOME and LANG only. A pids cgroup,
where this process may create one, caps the number of processes (a fork bomb); the parent enforces the wall-clock
limit and the output cap and kills the whole tree, whatever it did. Where user namespaces are not available the
code runs with the resource limits only, and `isolation` says so (the training log prints it).

A timeout, a crash, an infinite loop, a fork bomb or a huge print ends as a `ToolResult` whose output tells the
model what happened; nothing here raises for anything the code does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from spo_cli.tools.sandbox_child import SETUP_FAILED

CHILD = Path(__file__).with_name("sandbox_child.py")
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--net", "--fork", "--kill-child",
           "--mount-proc"]
FLOOD_FACTOR = 16  # output beyond this many times output_bytes stops the program (it is only cut before that)
WORKDIR_SHOWN = "/sandbox"  # what the model sees as its working directory's path (tracebacks, os.getcwd())
CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1's pids hierarchy, then v2


@dataclass(frozen=True)
class SandboxLimits:
    """What one call may use. Seconds of wall-clock and CPU time, MiB of memory (address space) and of files."""

    wall_seconds: float = 10.0
    cpu_seconds: float = 5.0
    memory_mb: int = 512
    output_bytes: int = 4096
    disk_mb: int = 16
    open_files: int = 64
    processes: int = 32


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome. `status`: ok, error (a non-zero exit or a signal), timeout (wall-clock or CPU time),
    output_limit (printed so much that it was stopped) or sandbox_error (the sandbox itself could not start: never
    the code's fault). `output` is what the model is shown: stdout and stderr interleaved, its middle cut to
    `output_bytes` when longer (head and tail kept), then a line on any limit."""

    output: str
    status: str
    seconds: float


class LocalSandbox:
    """Runs code in a fresh, isolated process tree per call (module docstring); `run_many` runs up to `workers`
    calls at once."""

    def __init__(self, limits: SandboxLimits, python: str | None = None, workers: int = 4, isolate: bool = True):
        self.limits = limits
        self.python = python or sys.executable
        self.workers = workers
        self.cgroup_parent = _pids_cgroup_parent()
        self.isolate = isolate and self._namespaces_work()

    @property
    def isolation(self) -> str:
        """One line for the run's log: what protects the machine from the code."""
        parts = []
        if self.isolate:
            parts.append("user/mount/PID/network namespaces (read-only filesystem, no network)")
        else:
            parts.append("NO namespaces (unshare or user namespaces unavailable): the code can read and write "
                         "what this user can and reach the network")  # fmt: skip
        if self.cgroup_parent is not None:
            parts.append(f"pids cgroup (at most {self.limits.processes} processes)")
        else:
            parts.append("no pids cgroup: a fork bomb is stopped only by the wall-clock limit")
        return "; ".join(parts)

    def run(self, code: str) -> ToolResult:
        start = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="spo-sandbox-"))
        cgroup = self._new_cgroup()
        try:
            output, status = self._run_in(code, workdir, cgroup)
        finally:
            if cgroup is not None:
                _kill_cgroup(cgroup)
            shutil.rmtree(workdir, ignore_errors=True)
        return ToolResult(output, status, time.perf_counter() - start)

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        if len(codes) <= 1 or self.workers <= 1:
            return [self.run(code) for code in codes]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.run, codes))

    def _command(self, workdir: Path, cgroup: Path | None, isolate: bool) -> list[str]:
        limits = self.limits
        config = {
            "workdir": str(workdir), "isolate": isolate, "python": self.python,
            "cgroup_procs": str(cgroup / "cgroup.procs") if cgroup is not None else None,
            "limits": {"cpu_seconds": limits.cpu_seconds, "memory_mb": limits.memory_mb,
                       "disk_mb": limits.disk_mb, "open_files": limits.open_files},
        }  # fmt: skip
        # -S: the wrapper needs only the standard library (the code itself runs with site-packages)
        return [*(UNSHARE if isolate else []), self.python, "-I", "-S", str(CHILD), json.dumps(config)]

    def _run_in(self, code: str, workdir: Path, cgroup: Path | None, isolate: bool | None = None) -> tuple[str, str]:
        isolate = self.isolate if isolate is None else isolate
        process = subprocess.Popen(
            self._command(workdir, cgroup, isolate), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=workdir, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            start_new_session=True,
        )  # fmt: skip
        reader = _CappedReader(process.stdout, self.limits.output_bytes)
        try:
            process.stdin.write(code.encode("utf-8", "replace"))
            process.stdin.close()
        except BrokenPipeError:  # it exited before reading the code: its output says why
            pass
        finished = reader.done.wait(self.limits.wall_seconds) and not reader.flooded
        if not finished:
            _kill_tree(process)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = returncode = os.waitstatus_to_exitcode(status)
        cpu_seconds = usage.ru_utime + usage.ru_stime  # unshare's, with the namespace's init it waited for
        reader.done.wait()
        text = reader.text().replace(str(workdir), WORKDIR_SHOWN)  # the same text for the same code, every call
        if reader.flooded:
            limit = FLOOD_FACTOR * self.limits.output_bytes
            return text + f"\n[the program printed more than {limit} bytes and was stopped]", "output_limit"
        if not finished:
            return text + f"\nTimeoutError: stopped after {self.limits.wall_seconds:g} s of wall-clock time", "timeout"
        if returncode == SETUP_FAILED and "sandbox setup failed" in text:
            return text, "sandbox_error"
        signum = -returncode if returncode < 0 else returncode - 128 if isolate and returncode > 128 else None
        if signum in (signal.SIGXCPU, signal.SIGKILL) and cpu_seconds >= int(self.limits.cpu_seconds):
            return text + f"\nTimeoutError: stopped after {self.limits.cpu_seconds:g} s of CPU time", "timeout"
        if returncode != 0:
            if signum is not None and signum in signal.Signals._value2member_map_:
                text += f"\n[killed by signal {signal.Signals(signum).name}]"
            return text, "error"
        return text, "ok"

    def _namespaces_work(self) -> bool:
        """Whether unshare can set up the namespaces here (a probe call; ~0.1 s)."""
        if shutil.which("unshare") is None:
            return False
        workdir = Path(tempfile.mkdtemp(prefix="spo-sandbox-probe-"))
        try:
            output, status = self._run_in("print('ok')", workdir, None, isolate=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return status == "ok" and output.strip() == "ok"

    def _new_cgroup(self) -> Path | None:
        if self.cgroup_parent is None:
            return None
        cgroup = self.cgroup_parent / uuid.uuid4().hex[:16]
        try:
            cgroup.mkdir()
            (cgroup / "pids.max").write_text(f"{self.limits.processes}\n")
        except OSError:
            return None
        return cgroup


class _CappedReader:
    """Reads a pipe to its end on a thread, keeping its first and last `cap / 2` bytes (a traceback's last line is
    what matters); `flooded` once more than FLOOD_FACTOR * cap bytes arrived, when the caller stops the program."""

    def __init__(self, pipe, cap: int):
        self.pipe, self.cap = pipe, cap
        self.head = bytearray()
        self.tail = bytearray()
        self.size = 0
        self.flooded = False
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        half = self.cap // 2
        try:
            while chunk := self.pipe.read1(65536):
                self.size += len(chunk)
                room = half - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                self.tail = (self.tail + chunk)[-(self.cap - half) :]
                if self.size > FLOOD_FACTOR * self.cap and not self.flooded:
                    self.flooded = True
                    self.done.set()  # the caller kills the tree; the pipe then ends
        finally:
            self.done.set()

    def text(self) -> str:
        if self.size <= self.cap:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        cut = self.size - len(self.head) - len(self.tail)
        head, tail = bytes(self.head).decode("utf-8", "replace"), bytes(self.tail).decode("utf-8", "replace")
        return f"{head}\n[... {cut} bytes of output cut ...]\n{tail}"


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the session: unshare and, through --kill-child, the PID namespace's init, which takes every process
    of the namespace with it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pids_cgroup_parent() -> Path | None:
    """A directory under a pids cgroup hierarchy where this process may create one cgroup per call, or None."""
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").is_file():
            continue
        if root.name != "pids" and "pids" not in _read(root / "cgroup.subtree_control"):
            continue
        parent = root / "spo-sandbox"
        try:
            parent.mkdir(exist_ok=True)
            probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()
            ok = (probe / "pids.max").is_file()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return parent
    return None


def _kill_cgroup(cgroup: Path) -> None:
    """Kill whatever is still in the cgroup (a process that left the session), then remove it."""
    for _ in range(100):
        pids = [int(p) for p in _read(cgroup / "cgroup.procs").split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    try:
        cgroup.rmdir()
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
