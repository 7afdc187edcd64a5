"""Landlock: let the model worker read only the folders it needs, and write nowhere.

seccomp sees system-call numbers and flags, not paths; Landlock (Linux 5.13+) restricts a
process to a set of file hierarchies, for itself and everything it starts. The worker handles
every file-system right the kernel knows and grants only reading: beneath the folders the
scanner allows (the model's, the data's), Python and its packages (lazy imports happen after
the rules), the system's shared libraries, and ``/proc``, ``/sys`` and a few ``/dev`` files
that ONNX Runtime and torch read for CPU information. From ABI 4 it also refuses TCP bind and
connect, and from ABI 6 signals and abstract Unix sockets to processes outside the sandbox.

Called through ``syscall(2)`` by ctypes (444 ``landlock_create_ruleset``, 445
``landlock_add_rule``, 446 ``landlock_restrict_self``, the same numbers on every
architecture). Landlock confines the calling thread and its future children only, so the
worker applies it before importing anything that starts threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import site
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["LandlockError", "abi_version", "default_read_paths", "restrict"]

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Access rights by the ABI version that introduced them.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV

# System folders holding no user data that libraries read at run time.
SYSTEM_READ = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/proc",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/null",
    "/dev/urandom",
    "/dev/random",
)


class LandlockError(RuntimeError):
    """The kernel has no Landlock, or refused the ruleset; the message says which."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("allowed_access", ctypes.c_uint64),
        ("parent_fd", ctypes.c_int32),
    ]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI (1..), or :class:`LandlockError` saying why not."""
    if sys.platform != "linux":
        raise LandlockError("Landlock exists on Linux only")
    libc = _libc()
    abi = libc.syscall(
        ctypes.c_long(_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )
    if abi < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise LandlockError("this kernel has no Landlock (ENOSYS)")
        if err == errno.EOPNOTSUPP:
            raise LandlockError("Landlock is disabled at boot (EOPNOTSUPP)")
        raise LandlockError(f"landlock_create_ruleset failed: {os.strerror(err)}")
    return int(abi)


def default_read_paths() -> list[str]:
    """Python's own folders (standard library, site-packages, this package, ``sys.path`` but
    the working folder) and the system folders of :data:`SYSTEM_READ`: what the worker needs
    to keep importing lazily."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        paths.add(user_site)
    # An editable install imports backdoorscan from its source folder.
    paths.add(str(Path(__file__).resolve().parents[2]))
    # PYTHONPATH is the user's explicit choice of code to import.
    paths.update(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    # Folders the interpreter's site setup added (.pth files: Debian's dist-packages, conda,
    # a venv layered on another's packages), but not the working folder, which `python -m`
    # puts first and which may be the user's home.
    cwd = os.getcwd()
    paths.update(p for p in sys.path if os.path.isabs(p) and os.path.normpath(p) != cwd)
    paths.update(SYSTEM_READ)
    return sorted(paths)


def restrict(read_paths: Iterable[str], list_paths: Iterable[str] = ()) -> int:
    """Confine this thread, and every thread and process it starts from now on, to reading
    beneath ``read_paths`` (missing ones are skipped) and to listing, not reading, the folders
    ``list_paths`` (where Python finds an ``--arch`` module: the import system lists a
    ``sys.path`` folder to find a module in it); returns the ABI version used."""
    abi = abi_version()
    libc = _libc()
    handled = _FS_ABI1
    if abi >= 2:
        handled |= _REFER
    if abi >= 3:
        handled |= _TRUNCATE
    if abi >= 5:
        handled |= _IOCTL_DEV
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
        size = 24
    fd = libc.syscall(
        ctypes.c_long(_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )
    if fd < 0:
        raise LandlockError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path in sorted(set(read_paths)):
            _allow_read(libc, int(fd), path)
        for path in sorted(set(list_paths)):
            _allow_read(libc, int(fd), path, list_only=True)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
        if libc.syscall(ctypes.c_long(_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)):
            err = os.strerror(ctypes.get_errno())
            raise LandlockError(f"landlock_restrict_self: {err}")
    finally:
        os.close(int(fd))
    return abi


def _allow_read(libc: ctypes.CDLL, ruleset: int, path: str, list_only: bool = False) -> None:
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a folder that does not exist here needs no rule
    try:
        is_dir = os.path.isdir(f"/proc/self/fd/{pfd}") or os.path.isdir(path)
        if list_only and not is_dir:
            return
        rights = _READ_DIR if list_only else _READ_FILE | (_READ_DIR if is_dir else 0)
        rule = _PathBeneath(rights, pfd)
        if is_dir is False:
            rule.allowed_access &= _FILE_RIGHTS
        rc = libc.syscall(
            ctypes.c_long(_ADD_RULE),
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
        if rc < 0:
            err = os.strerror(ctypes.get_errno())
            raise LandlockError(f"landlock_add_rule for {path}: {err}")
    finally:
        os.close(pfd)
