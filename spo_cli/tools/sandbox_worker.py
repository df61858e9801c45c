"""The sandbox worker (docs/tools.md#the-local-sandbox): a pre-started Python that runs each call of model-written
code in a fresh child it forks, so a call costs a fork, not an interpreter start.

It is started inside the jail (nsjail: its own user, mount, PID, network, IPC and UTS namespaces, an unprivileged
uid, no capabilities, a syscall filter; docs/tools.md) or, where the recipe allows it, with no isolation at all. It
is handed its source with `python -I -u -B -c`, so it imports nothing from spo and nothing outside the standard
library: it must start fast and trust nothing around it.

Protocol, over the socket it gets as stdin: spo sends a request (a 4-byte length, then JSON: code, limits) with the
write end of a fresh pipe attached (SCM_RIGHTS); the worker empties its working directory, forks the call's child
with that pipe as its stdout and stderr, waits for it, kills every process the call left behind and answers (the
same framing: exit code, CPU seconds). The pipe reaches end-of-file once the call and all it started are gone. The
wall-clock limit is spo's: it kills the worker, which takes the whole jail with it.

argv[1] is a JSON object: workdir, mode ("jail" or "unisolated") and run_as (a uid for the call's processes, in the
unisolated mode when spo runs as root; else null).
"""

import array
import atexit
import builtins
import ctypes
import io
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import types

PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 24, 36, 4, 38
SETUP_FAILED = 125  # spo's sign that the sandbox, not the code, failed
SHM_DIR = ".shm"  # /dev/shm points here inside the jail: shared memory is counted in the working directory's size
HEADER = struct.Struct("!I")


def main():
    config = json.loads(sys.argv[1])
    control = socket.socket(fileno=0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no call can read this process's memory or descriptors in /proc
    if config["mode"] == "unisolated":
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what a call leaves (a setsid daemon) becomes our child
        signal.signal(signal.SIGTERM, lambda *_: _leave(config, config.get("call")))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        request, output = _receive(control)
        if request is None:
            _leave(config)
        reply = _run_call(request, output, control, config, libc)
        _send(control, reply)


def _leave(config, call=None):
    """Spo is done with this worker (or gone): nothing of its calls stays behind."""
    _kill_leftovers(config, call)
    if config["mode"] == "unisolated":
        shutil.rmtree(config["workdir"], ignore_errors=True)
    os._exit(0)


def _receive(control):
    """The next request and the pipe its output goes to, or (None, None) when spo closed the socket."""
    fds = array.array("i")
    data, ancillary, _, _ = control.recvmsg(HEADER.size, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(data) < HEADER.size or not fds:
        return None, None
    (size,) = HEADER.unpack(data)
    body = bytearray()
    while len(body) < size:
        chunk = control.recv(size - len(body))
        if not chunk:
            return None, None
        body += chunk
    return json.loads(body), fds[0]


def _send(control, reply):
    body = json.dumps(reply).encode()
    control.sendall(HEADER.pack(len(body)) + body)


def _run_call(request, output, control, config, libc):
    workdir = config["workdir"]
    _empty(workdir)
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as script:
        script.write(request["code"])
    if config["run_as"] is not None:
        os.chown(workdir, config["run_as"], config["run_as"])
    pid = config["call"] = os.fork()
    if pid == 0:
        try:
            _child(request, output, config, libc)
        except BaseException as error:  # noqa: BLE001 - the child must never return into the worker's loop
            _say(f"sandbox setup failed: {error!r}\n", output)
        finally:
            os._exit(SETUP_FAILED)
    os.close(output)
    _, status, usage = _wait_for(pid, control, config)
    _kill_leftovers(config, call=pid)
    return {"exit": os.waitstatus_to_exitcode(status), "cpu_seconds": usage.ru_utime + usage.ru_stime}


def _say(text, output):
    for fd in (2, output):  # the call's output once it is set up, the pipe before
        try:
            os.write(fd, text.encode())
            return
        except OSError:
            pass


def _wait_for(pid, control, config):
    """wait4(pid), and should spo go away meanwhile (its end of the socket closes), kill the call and exit: no
    call outlives the run that made it."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return os.wait4(pid, 0)
    with os.fdopen(pidfd) as exited:
        while True:
            ready, _, _ = select.select([exited, control], [], [])
            if exited in ready:
                return os.wait4(pid, 0)
            if not control.recv(1, socket.MSG_PEEK):
                _leave(config, call=pid)


def _empty(workdir):
    """The working directory as a new call finds it: empty but for the shared-memory directory."""
    for entry in os.scandir(workdir):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, onerror=lambda *_: _chmod_tree(entry.path))
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
    os.mkdir(os.path.join(workdir, SHM_DIR), 0o1777)


def _chmod_tree(path):
    """A call may leave directories it made unreadable; they are ours to open again."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
    os.chmod(path, 0o700)


def _kill_leftovers(config, call=None):
    """Kill every process the call left (a daemon, a fork bomb) and reap them. In the jail this process is the PID
    namespace's init: kill(-1) reaches every other process in it. Unisolated, it is their subreaper: orphans come to
    it, and killing its children until none is left takes every descendant, a setsid daemon included; the call's
    process group and, as root, its uid go first, all at once (a fork bomb outruns one-by-one)."""
    if config["mode"] == "unisolated":
        if call is not None:
            _signal(-call)
        if config["run_as"] is not None:
            _kill_every_process_of(config["run_as"])
    while True:
        for pid in [-1] if config["mode"] == "jail" else _children():
            _signal(pid)
        try:
            os.waitpid(-1, 0)  # every child was sent SIGKILL: this returns
        except ChildProcessError:
            return


def _kill_every_process_of(uid):
    """kill(-1) as `uid`: every process of that uid, atomically (a fork cannot complete meanwhile)."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setresuid(uid, uid, uid)
            for _ in range(2):
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _signal(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children():
    me = str(os.getpid())
    pids = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as children:
                pids += [int(pid) for pid in children.read().split()]
        except OSError:
            pass
    return pids


def _child(request, output, config, libc):
    os.setsid()
    os.dup2(output, 1)
    os.dup2(output, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if config["run_as"] is not None:
        uid = config["run_as"]
        for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # not even a setuid program gives one back
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root: every capability goes with it
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(config["workdir"])
    _set_limits(request["limits"], config)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os._exit(_run_main(request["code"], config["workdir"]))


def _set_limits(limits, config):
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    memory = limits["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    disk = limits["disk_mb"] << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk, disk))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    nproc = limits["nproc"]
    if config["mode"] == "unisolated" and config["run_as"] is None:
        nproc += _processes_of(os.getuid())  # RLIMIT_NPROC counts every process of the uid, the user's own too
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _processes_of(uid):
    count = 0
    for entry in os.listdir("/proc"):
        try:
            count += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid
        except OSError:
            pass
    return count


def _run_main(code, workdir):
    """Run `code` as `python -I -u -B main.py` would in a fresh interpreter, and return its exit code: a fresh
    `__main__`, unbuffered standard streams, the traceback of an uncaught exception from main.py down, threads
    joined and exit handlers run at the end."""
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.argv = ["main.py"]
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(workdir, "main.py")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(code, main.__file__, "exec"), main.__dict__)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as error:  # noqa: BLE001 - the model's exception, shown as Python shows it
        below = error.__traceback__.tb_next  # from main.py down: the worker's own frame is not the model's business
        sys.excepthook(type(error), error.with_traceback(below), below)
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a broken stream or a hook that raised: the exit code stands
        pass
    return code


def _exit_code(value):
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
