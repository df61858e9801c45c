"""The first program inside a sandbox (docs/tools.md#the-local-sandbox): run by `python -I` under `unshare` (new
user, mount, PID and network namespaces), or directly where namespaces are not available. It makes every mount
read-only, mounts a size-limited tmpfs as the working directory, gives up every capability, sets the resource
limits and execs the model's code, which it reads from stdin. Standard library only, nothing imported from spo:
it must start fast and trust nothing around it.

argv[1] is a JSON object: workdir, isolate (bool: namespaces are set up), python, cgroup_procs (the cgroup.procs
file of a pids cgroup to join first, or null) and the limits (cpu_seconds, memory_mb, disk_mb, open_files).
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 28, 38
# noroot and no_setuid_fixup with their locks, keep_caps locked off, no_cap_ambient_raise with its lock
SECURE_BITS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7)
SETUP_FAILED = 125  # the parent's sign that the sandbox, not the code, failed


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), what)


def isolate_filesystem(libc, workdir, disk_mb):
    """Every mount read-only in this (private) mount namespace; a fresh tmpfs of `disk_mb` at `workdir`."""
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "/")  # nothing here reaches the host
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in points:
        if point.startswith(("/proc", "/dev")):
            continue
        target = point.encode()
        if libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None) != 0:
            # a mount whose nosuid/nodev flags are locked by the user namespace: read-only is what matters
            _check(libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), point)
    options = f"size={disk_mb}m,mode=0777,nr_inodes=4096".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), workdir)


def drop_capabilities(libc):
    """No capability now or after exec: the code cannot undo the read-only mounts or anything else set here."""
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"capability {cap}")
    _check(libc.prctl(PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0), "securebits")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty
    _check(libc.syscall(126, header, data), "capset")  # SYS_capset on x86-64
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits):
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    memory = limits["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    disk = limits["disk_mb"] << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk, disk))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main():
    config = json.loads(sys.argv[1])
    code = sys.stdin.read()
    workdir, limits = config["workdir"], config["limits"]
    try:
        if config["cgroup_procs"]:
            with open(config["cgroup_procs"], "w") as procs:  # before anything forks: every process is counted
                procs.write("0")
        if config["isolate"]:
            libc = _libc()
            isolate_filesystem(libc, workdir, limits["disk_mb"])
            drop_capabilities(libc)
        os.chdir(workdir)
        with open("main.py", "w") as script:
            script.write(code)
        set_limits(limits)
    except OSError as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    # -I: no user site, no PYTHON* variables; -u: stdout and stderr interleave as a terminal shows them, and what
    # was printed before a kill is kept; -B: no bytecode files in the small working directory.
    argv = [config["python"], "-I", "-u", "-B", "main.py"]
    if not config["isolate"]:
        os.execve(config["python"], argv, env)
    # This process is the PID namespace's init, which no signal without a handler reaches, not even the kernel's
    # SIGXCPU: the code runs in a child, and when this process exits every process left in the namespace dies.
    child = os.fork()
    if child == 0:
        os.execve(config["python"], argv, env)
    while True:
        pid, status = os.wait()  # reaps orphans too
        if pid == child:
            os._exit(exit_status(status))


def exit_status(status):
    """The code's exit code, or 128 + the signal that killed it (as a shell reports it)."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    main()
