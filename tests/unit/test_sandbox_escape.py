"""Programs written to get out of the jail (docs/tools.md, the threat model), each checked from the host's side
where its effect would be on the host. They run against the jailed sandbox and skip, saying why, where this machine
cannot make a jail (no nsjail, no user namespaces); CI's log shows which ran (`-rs`).

Each program is harmless to the host even where the sandbox does not hold (run against spo's old wrapper, these
tests failed without touching the host): it opens kernel settings for writing without writing, removes what it
managed to create, gives the calls that would act (reboot, kexec, sethostname, clone) arguments the kernel refuses
after its permission check, and signals pid 1 only inside a PID namespace of its own."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from spo_cli.tools import jail
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits, SandboxUnavailable

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=10.0, memory_mb=256, output_bytes=20000, disk_mb=4)
WORKER_MARK = b"The sandbox worker (docs/tools.md"


@pytest.fixture(scope="module")
def box() -> LocalSandbox:
    try:
        sandbox = LocalSandbox(LIMITS, workers=1)
    except SandboxUnavailable as exc:
        pytest.skip(f"no jail on this machine: {exc}")
    with sandbox:
        yield sandbox


def run_json(box: LocalSandbox, code: str):
    result = box.run("import json, os, errno\n" + code)
    assert result.status == "ok", result.output
    return json.loads(result.output.strip().splitlines()[-1])


ATTEMPT = '''
def attempt(action):
    try:
        value = action()
        return "SUCCEEDED: %r" % (value,)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
'''


def test_kernel_settings_cannot_be_written(box):
    """As root, the old sandbox's uid 0 was the host's and /proc/sys was writable (core_pattern: root code
    execution on the host)."""
    settings = [Path("/proc/sys/kernel/core_pattern"), Path("/proc/sys/kernel/printk_ratelimit")]
    before = [path.read_text() for path in settings]
    code = ATTEMPT + (  # opened for writing, never written: a sandbox that fails this changes nothing
        "paths = ['/proc/sys/kernel/core_pattern', '/proc/sys/kernel/printk_ratelimit', '/proc/sys/vm/drop_caches',"
        " '/proc/sysrq-trigger']\n"
        "print(json.dumps([attempt(lambda: open(p, 'w').close()) for p in paths]))"
    )
    outcomes = run_json(box, code)
    assert not any(o.startswith("SUCCEEDED") for o in outcomes), outcomes
    assert [path.read_text() for path in settings] == before


def test_every_process_in_the_jail_is_an_unprivileged_host_uid(box):
    """From the host: no process of the jail (worker or call) is uid 0, and the call has no capability."""
    found: list[tuple[int, list[int]]] = []

    def look():
        time.sleep(0.5)
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
                if argv and WORKER_MARK in b" ".join(argv) and not argv[0].endswith(b"nsjail"):
                    uids = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid"))
                    found.append((int(entry.name), [int(u) for u in uids.split()[1:]]))
            except (OSError, StopIteration):
                pass

    looker = threading.Thread(target=look)
    looker.start()
    status = box.run("import time\ntime.sleep(1.5)\nprint(open('/proc/self/status').read())")
    looker.join()
    assert len(found) >= 2, "the worker and the call were seen"
    assert all(0 not in uids for _, uids in found), found
    fields = dict(line.split(":\t", 1) for line in status.output.splitlines() if ":\t" in line)
    assert {fields[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"


def test_dev_is_private_with_only_the_harmless_devices(box):
    host_shm = set(os.listdir("/dev/shm"))
    code = ATTEMPT + (
        "listing = sorted(os.listdir('/dev'))\n"
        "made = [attempt(lambda: (open('/dev/escaped', 'w').close(), os.unlink('/dev/escaped'))),\n"
        "        attempt(lambda: os.mknod('/sandbox/sda', 0o600 | 0o060000, os.makedev(8, 0)))]\n"
        "try:\n    shm = attempt(lambda: open('/dev/shm/big', 'wb').write(b'x' * (8 << 20)))\n"
        "finally:\n    attempt(lambda: os.unlink('/dev/shm/big'))\n"
        "open('/dev/null', 'w').write('fine'); random = len(open('/dev/urandom', 'rb').read(8))\n"
        "print(json.dumps([listing, made, shm, random]))"
    )
    listing, made, shm, random = run_json(box, code)
    devices = {"null", "zero", "random", "urandom"}
    assert set(listing) == devices | {"fd", "stdin", "stdout", "stderr", "shm"}
    assert not any(o.startswith("SUCCEEDED") for o in made), made
    assert shm == "ENOSPC", "/dev/shm is counted in the working directory's disk_mb (4 MiB)"
    assert random == 8
    assert set(os.listdir("/dev/shm")) == host_shm, "nothing reached the host's /dev/shm"
    assert "big" not in box.run("import os\nprint(os.listdir('/dev/shm'))").output, "the next call starts clean"


def test_no_host_socket_is_reachable(box, tmp_path):
    """A socket file (docker.sock, an ssh agent) and an abstract socket (dbus, X11) on the host."""
    path_socket = socket.socket(socket.AF_UNIX)
    path = tmp_path / "host.sock"
    path_socket.bind(str(path))
    path.chmod(0o777)
    tmp_path.chmod(0o755)
    abstract = socket.socket(socket.AF_UNIX)
    name = f"spo-test-{uuid.uuid4().hex}"
    abstract.bind("\0" + name)
    for listener in (path_socket, abstract):
        listener.listen(1)
        listener.settimeout(0.5)
    code = ATTEMPT + (
        "import socket, stat\n"
        "def connect(address):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect(address)\n    return 'connected'\n"
        f"outcomes = [attempt(lambda: connect({str(path)!r})), attempt(lambda: connect('\\0{name}'))]\n"
        "found = []\n"
        "for root, dirs, files in os.walk('/'):\n"
        "    if root == '/proc':\n        dirs.clear()\n        continue\n"
        "    for f in files:\n"
        "        try:\n            if stat.S_ISSOCK(os.lstat(os.path.join(root, f)).st_mode):\n"
        "                found.append(os.path.join(root, f))\n"
        "        except OSError:\n            pass\n"
        "print(json.dumps([outcomes, found]))"
    )
    outcomes, socket_files = run_json(box, code)
    assert outcomes == ["ENOENT", "ECONNREFUSED"], outcomes
    assert socket_files == [], "the jail's filesystem holds no socket file at all"
    for listener in (path_socket, abstract):
        with pytest.raises(TimeoutError):
            listener.accept()
        listener.close()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the syscall numbers below are x86-64's")
def test_the_syscall_filter_refuses_what_a_program_has_no_business_doing(box):
    attempts = {  # name: (number, arguments)
        "mount": (165, "b'none', b'/sandbox', b'tmpfs', 0, None"), "umount2": (166, "b'/usr', 0"),
        "unshare(NEWUSER)": (272, "0x10000000"), "setns": (308, "0, 0"), "chroot": (161, "b'/sandbox'"),
        "pivot_root": (155, "b'/sandbox', b'/sandbox'"), "keyctl": (250, "0, 0, 0, 0, 0"),
        "add_key": (248, "b'user', b'k', b'v', 1, -4"), "bpf": (321, "0, None, 0"),
        "perf_event_open": (298, "None, 0, -1, -1, 0"), "init_module": (175, "None, 0, b''"),
        "finit_module": (313, "0, b'', 0"), "ptrace(TRACEME)": (101, "0, 0, 0, 0"),
        "process_vm_readv": (310, "1, None, 0, None, 0, 0"), "clone(NEWUSER|FS)": (56, "0x10000000 | 0x200, 0, 0, 0, 0"),
        "clone3": (435, "None, 0"), "io_uring_setup": (425, "1, None"), "userfaultfd": (323, "0"),
        "kexec_load": (246, "0, 0, None, 0xdead0000"), "reboot": (169, "0xfee1dead, 672274793, 0xdeadbeef, None"),
        "syslog": (103, "3, None, 0"), "open_by_handle_at": (304, "0, None, 0"), "swapon": (167, "b'/x', 0"),
        "sethostname": (170, "b'evil', 4096"), "socket(NETLINK)": (41, "16, 3, 0"), "socket(PACKET)": (41, "17, 3, 0"),
        "x32 unshare": (0x40000000 | 272, "0x10000000"), "x32 mount": (0x40000000 | 165, "None, None, None, 0, None"),
    }  # fmt: skip
    lines = ["import ctypes", "libc = ctypes.CDLL(None, use_errno=True)", "libc.syscall.restype = ctypes.c_long",
             "out = {}"]  # fmt: skip
    for name, (number, args) in attempts.items():
        lines.append(f"out[{name!r}] = (libc.syscall({number}, {args}), errno.errorcode.get(ctypes.get_errno()))")
    outcomes = run_json(box, "\n".join(lines) + "\nprint(json.dumps(out))")
    assert {name: result for name, (result, _) in outcomes.items() if result >= 0} == {}, outcomes
    assert outcomes["clone3"][1] == "ENOSYS", "glibc falls back to clone, whose flags the filter reads"
    # the kernel itself answers EINVAL to NEWUSER with FS: EPERM is the filter's
    assert outcomes["clone(NEWUSER|FS)"][1] == "EPERM"
    assert outcomes["socket(NETLINK)"][1] == "EAFNOSUPPORT"
    fork = box.run("import os\npid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
    assert fork.output == "7\n", "plain fork and threads still work"


def test_proc_is_the_jails_own_and_read_only(box):
    code = ATTEMPT + (
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "init = open('/proc/1/cmdline', 'rb').read().split(b'\\0')[:4]\n"
        "writes = [attempt(lambda: open('/proc/sys/kernel/hostname', 'w').close()),"
        " attempt(lambda: open('/proc/self/oom_score_adj', 'w').write('-1000'))]\n"
        "print(json.dumps([pids, [part.decode() for part in init], writes, os.path.exists('/sys/kernel')]))"
    )
    pids, init, writes, sys_visible = run_json(box, code)
    assert pids[0] == 1 and len(pids) <= 3, "the worker, the call, nothing of the host's"
    assert init[1:4] == ["-I", "-u", "-B"], "pid 1 is the worker"
    assert writes[0] in ("EROFS", "EACCES") and not writes[1].startswith("SUCCEEDED")
    assert sys_visible is False


def test_the_hosts_files_are_out_of_sight(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o644)
    home = Path.home() / f".spo-escape-test-{uuid.uuid4().hex}"
    home.write_text("hunter2")
    code = ATTEMPT + (
        f"paths = ['/etc/shadow', '/etc/passwd', '/home', '/tmp', '/var/run', '/run', {str(secret)!r},"
        f" {str(REPO / 'README.md')!r}, {str(home)!r}]\n"
        "print(json.dumps({p: os.path.exists(p) for p in paths} | {'/usr is read-only': attempt(lambda: open('/usr/x', 'w'))}))"
    )
    try:
        seen = run_json(box, code)
    finally:
        home.unlink()
    assert seen.pop("/usr is read-only") in ("EROFS", "EACCES")
    assert not any(seen.values()), f"visible in the jail: {[p for p, v in seen.items() if v]}"


def test_no_network(box):
    code = ATTEMPT + (
        "import socket\n"
        "print(json.dumps([attempt(lambda: socket.create_connection(('1.1.1.1', 53), timeout=2)),"
        " attempt(lambda: socket.create_connection(('127.0.0.1', 22), timeout=2))]))"
    )
    assert run_json(box, code) == ["ENETUNREACH", "ECONNREFUSED"]


def test_the_worker_itself_cannot_be_reached_from_a_call(box):
    """The call's parent is the worker that serves the next calls: it must stay out of the call's reach."""
    worker_before = box._pool.snapshot()[0].process.pid
    code = ATTEMPT + (
        "import signal\n"
        # pid 1 is signalled only when it is this jail's worker: never the host's init, whatever holds or not
        "ours = open('/proc/1/cmdline', 'rb').read().split(b'\\0')[1:4] == [b'-I', b'-u', b'-B']\n"
        "signals = [attempt(lambda: os.kill(1, s)) for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)] if ours"
        " else ['NOT THE WORKER']\n"
        "print(json.dumps(signals + [attempt(lambda: open('/proc/1/mem', 'rb').read(1)),"
        " attempt(lambda: os.listdir('/proc/1/fd')), attempt(lambda: open('/proc/1/environ').read())]))"
    )
    outcomes = run_json(box, code)
    assert outcomes[0] != "NOT THE WORKER", "the call's pid 1 is its worker"
    assert not any(o.startswith("SUCCEEDED") and o != "SUCCEEDED: None" for o in outcomes[3:]), outcomes
    assert box.run("print('still here')").output == "still here\n"
    assert box._pool.snapshot()[0].process.pid == worker_before, "the same worker served the next call"


def test_a_user_who_is_not_root_gets_the_same_jail():
    """spo run by an ordinary user: the jail's uid is that user's on the host (a user namespace); unisolated, the
    code cannot read spo's /proc/<pid>/environ. Run with the system's Python as uid 1000 (setpriv)."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(python, os.X_OK) or not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs root (to become another user with setpriv) and a system Python every uid can read")
    nsjail = jail.find_nsjail()
    if nsjail is None:
        pytest.skip("nsjail is not installed")
    shared = Path(tempfile.mkdtemp(prefix="spo-as-user-"))  # pytest's own tmp_path is private to root
    shared.chmod(0o755)
    script = shared / "as_user.py"
    script.write_text(AS_USER)
    script.chmod(0o644)
    env = {"PATH": f"{Path(nsjail).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "SPO_TEST_SECRET": "hunter2",
           "HOME": "/nonexistent"}  # fmt: skip
    try:
        result = subprocess.run(
            ["/usr/bin/setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", python, str(script)],
            capture_output=True, text=True, env=env, timeout=120, cwd=shared,
        )
    finally:
        shutil.rmtree(shared)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["jail"] is None:
        pytest.skip(f"no jail for an ordinary user here: {report['why']}")
    uid_inside, uid_map, caps = report["jail"]
    assert uid_inside == str(jail.SANDBOX_UID) and uid_map.split()[:2] == [str(jail.SANDBOX_UID), "1000"]
    assert caps == "0000000000000000"
    assert report["unisolated"] == "PermissionError", "spo's environment stays out of the code's reach"


AS_USER = """
import json, os, sys
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits, SandboxUnavailable
limits = SandboxLimits(wall_seconds=10, cpu_seconds=5, memory_mb=256)
report = {"jail": None, "why": ""}
try:
    with LocalSandbox(limits, workers=1) as box:
        out = box.run("import os\\nprint(os.getuid())\\nprint(open('/proc/self/uid_map').read().strip())\\n"
                      "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])")
        report["jail"] = out.output.splitlines()
except SandboxUnavailable as exc:
    report["why"] = str(exc)
with LocalSandbox(limits, workers=1, allow_unisolated=True, try_jail=False) as box:
    code = "try:\\n    print(open('/proc/%d/environ').read())\\nexcept OSError as e:\\n    print(type(e).__name__)" % os.getpid()
    report["unisolated"] = box.run(code).output.strip()
print(json.dumps(report))
"""
