"""A seccomp filter for the model worker, through libseccomp (Debian ``libseccomp2``) and ctypes.

The filter denies what a model never needs and an attacker always wants: running programs,
new processes, network sockets, opening files for writing, changing the file system, tracing
or signalling other processes, and kernel facilities that bypass the rest (io_uring,
open_by_handle_at, bpf, mount, modules). Denied calls fail with EPERM (ENOSYS for the two
whose arguments seccomp cannot see and whose callers fall back to an older call), so Python
raises ``PermissionError`` and the worker reports it instead of dying silently. Threads stay
allowed: ``clone`` is refused only without ``CLONE_THREAD``. Writes to descriptors opened
before the filter (the pipe to the scanner, the log file) stay allowed.

seccomp cannot read path strings, so *which* files may be read is Landlock's job
(``landlock.py``). The filter is installed with ``SECCOMP_FILTER_FLAG_TSYNC`` so that threads
libraries started earlier are covered too, and it is inherited by every thread made later.

libseccomp is bound directly with ctypes (six functions), so no Python package is needed:
PyPI's ``pyseccomp`` is itself a ctypes binding to the same system library.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["DENIED", "SeccompError", "available", "install"]

_ACT_ALLOW = 0x7FFF0000
_CMP_NE = 1
_CMP_MASKED_EQ = 7
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_CLONE_THREAD = 0x00010000
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC)
_TIOCSTI = 0x5412  # push characters into a terminal's input: a classic sandbox escape
_TIOCLINUX = 0x541C
# System calls newer than some libseccomp releases know, by number (x86_64).
_X86_64_NUMBERS = {"fchmodat2": 452, "mseal": 462}

# Refused outright (EPERM): each line is a family an attacker would use.
DENIED: tuple[str, ...] = (
    # programs and processes
    "execve",
    "execveat",
    "fork",
    "vfork",
    # network and local sockets
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    # changing the file system (opening for writing is filtered by flags below)
    "creat",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "mknod",
    "mknodat",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "truncate",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    # kernel facilities that sidestep the rules above or the machine's configuration
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "fanotify_init",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "sethostname",
    "setdomainname",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
    "iopl",
    "ioperm",
    "vhangup",
)
# Arguments in memory that seccomp cannot inspect: ENOSYS makes glibc fall back to clone()
# and lets callers of openat2 fall back to openat, both of which are filtered by argument.
_NOSYS = ("clone3", "openat2")


class SeccompError(RuntimeError):
    """libseccomp is missing, or the kernel refused the filter; the message says which."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _library() -> ctypes.CDLL:
    if os.environ.get("BACKDOORSCAN_SANDBOX_TEST_NO_SECCOMP") == "1":  # tests of the refusal
        raise SeccompError("libseccomp is not installed (simulated by a test)")
    # By soname through the dynamic loader: ctypes.util.find_library would run ldconfig or
    # gcc and write a temporary file, which the worker can no longer do at this point.
    for name in ("libseccomp.so.2", "libseccomp.so"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    else:
        raise SeccompError("libseccomp is not installed (Debian/Ubuntu: apt install libseccomp2)")
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_load.restype = ctypes.c_int
    return lib


def available() -> str | None:
    """None where the filter can be built here, else why not (one phrase)."""
    if os.uname().sysname != "Linux":
        return "seccomp exists on Linux only"
    try:
        _library()
    except SeccompError as exc:
        return str(exc)
    return None


def install() -> int:
    """Build and load the filter into this process (all its threads); returns the number of
    rules. Raises :class:`SeccompError` when it cannot be loaded."""
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    rules = 0

    def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nonlocal rules
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            nr = _X86_64_NUMBERS.get(name, -1) if os.uname().machine == "x86_64" else -1
            if nr < 0:
                return  # not a system call on this architecture: nothing to deny
        arr = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(*c) for c in cmps])
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise SeccompError(f"cannot add the rule for {name}: {os.strerror(-rc)}")
        rules += 1

    try:
        lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 1)
        if lib.seccomp_attr_set(ctx, _ATTR_CTL_TSYNC, 1) < 0:
            raise SeccompError("this libseccomp cannot synchronise the filter to threads")
        eperm = _errno_action(errno.EPERM)
        for name in DENIED:
            rule(eperm, name)
        for name in _NOSYS:
            rule(_errno_action(errno.ENOSYS), name)
        # clone without CLONE_THREAD is a new process (fork, posix_spawn, vfork).
        rule(eperm, "clone", (0, _CMP_MASKED_EQ, _CLONE_THREAD, 0))
        # open/openat with any write-ish flag; each rule is one flag, rules are or-ed.
        for flag in _WRITE_FLAGS:
            rule(eperm, "open", (1, _CMP_MASKED_EQ, flag, flag))
            rule(eperm, "openat", (2, _CMP_MASKED_EQ, flag, flag))
        # Signals only to itself (raise(), pthread_kill within the process).
        me = os.getpid()
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            rule(eperm, name, (0, _CMP_NE, me, 0))
        for cmd in (_TIOCSTI, _TIOCLINUX):
            rule(eperm, "ioctl", (1, _CMP_MASKED_EQ, 0xFFFFFFFF, cmd))
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(f"the kernel refused the seccomp filter: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return rules
