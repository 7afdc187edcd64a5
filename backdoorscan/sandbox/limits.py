"""What the model worker is allowed, and the errors that say it went past it.

Both sides of the sandbox import this module: the scanner to describe the limits, the worker
to apply the resource limits to itself. It imports nothing from the rest of backdoorscan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IsolationStatus",
    "Limits",
    "ModelError",
    "SandboxError",
    "WorkerMemoryError",
    "WorkerTimeout",
    "format_bytes",
]


class SandboxError(RuntimeError):
    """The model worker failed, was stopped, or could not be confined; the message is one line
    that says why (and, where the user can act, what to change)."""


class WorkerTimeout(SandboxError):  # noqa: N818 - the name the pipeline uses
    """A request to the worker took longer than ``Limits.timeout``; the worker was killed."""


class WorkerMemoryError(SandboxError):
    """The model needed more memory than ``Limits.max_memory``; the worker failed or was killed."""


class ModelError(SandboxError):
    """The request raised inside the worker (an unreadable model, a failing graph, a denied
    system call). ``kind`` is the exception's class name in the worker, e.g. ``AdapterError``,
    ``ExtractionError`` or ``PermissionError``; the message is the worker's first line."""

    def __init__(self, message: str, kind: str = "Exception") -> None:
        super().__init__(message)
        self.kind = kind


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of ``text``, stripped and cut to ``limit`` characters: every
    message that crosses the sandbox, and every message it raises, is one line. A line that
    ends in a colon announces its cause on the next one (``X is not a TorchScript archive
    torch can load: \nUnknown type name '__builtin__.exec'``): that line is joined to it."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[0]
    for nxt in lines[1:3]:
        if not line.endswith(":"):
            break
        line = f"{line} {nxt}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def format_bytes(n: int) -> str:
    """``n`` bytes the way ``--max-memory`` takes them (``512M``, ``2G``, ``1.5G``)."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class Limits:
    """The bounds a :class:`~backdoorscan.sandbox.ModelWorker` puts on the process that parses
    and runs an untrusted model.

    ``max_memory``: bytes the worker may map beyond what Python and the libraries take once
        imported (``None``: unbounded). Enforced by the kernel with ``RLIMIT_AS`` and
        ``RLIMIT_DATA``, set to the worker's own baseline plus this figure after its libraries
        are imported and before any model byte is read; so the worker's resident memory never
        exceeds ``baseline VM + max_memory`` (``IsolationStatus.baseline_vm``).
    ``timeout``: seconds each request may take (``None``: unbounded); past it the worker is
        killed with SIGKILL and :class:`WorkerTimeout` raised.
    ``allow_read``: folders (or files) the worker may read besides Python and its libraries:
        the model's folder, the data's folder. Enforced with Landlock where the kernel has it.
    ``seccomp``: install the system-call filter (no exec, fork, sockets, file writes, ...) and
        the Landlock rules. Where the filter cannot be installed the worker refuses to start
        (:class:`SandboxError`) unless ``trust`` is set.
    ``landlock``: restrict reads to ``allow_read`` plus Python's own folders (best effort: a
        kernel without Landlock is reported in :attr:`IsolationStatus.landlock`, not refused).
    ``trust``: the user vouches for the model (``--trust-model``): run it even where the
        system-call filter is unavailable.
    """

    max_memory: int | None = None
    timeout: float | None = 600.0
    allow_read: tuple[str, ...] = field(default=())
    seccomp: bool = True
    landlock: bool = True
    trust: bool = False

    def __post_init__(self) -> None:
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError("max_memory must be a positive number of bytes or None")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds or None")
        # Accept any sequence of str/Path; store absolute, symlink-resolved strings, which is
        # what Landlock rules are made from.
        paths = tuple(str(Path(p).expanduser().resolve()) for p in self.allow_read)
        object.__setattr__(self, "allow_read", paths)


@dataclass(frozen=True)
class IsolationStatus:
    """What the worker really got, for the scan report: each field is a short phrase.

    ``seccomp``: ``"on"``, ``"off"`` or ``"unavailable: <why>"``; ``landlock``: ``"on (ABI n)"``,
    ``"off"`` or ``"unavailable: <why>"``; ``memory``: the limits set (or ``"unbounded"``);
    ``baseline_vm``: the worker's virtual size once its libraries were imported (bytes), which
    the memory limit comes on top of; ``frameworks``: the libraries imported before the limits.
    """

    seccomp: str
    landlock: str
    memory: str
    baseline_vm: int
    frameworks: tuple[str, ...]

    def summary(self) -> str:
        """One line for a report: ``seccomp on; landlock on (ABI 7); memory RLIMIT_AS=...``."""
        return f"seccomp {self.seccomp}; landlock {self.landlock}; memory {self.memory}"


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``Vm*`` figures (bytes) and thread count of a process from ``/proc/PID/status``;
    empty where there is no such file (not Linux, or the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith("Vm") and value.strip().endswith("kB"):
                    out[key] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(value.strip())
    except (OSError, ValueError):
        return {}
    return out


def apply_memory_limit(max_memory: int | None) -> tuple[str, int]:
    """Set ``RLIMIT_AS`` and ``RLIMIT_DATA`` of this process to its current size plus
    ``max_memory``; returns (a description, the baseline virtual size).

    Called by the worker once its libraries are imported: ONNX Runtime and torch reserve
    address space they never touch, so a limit on the total would have to be gigabytes; on top
    of the measured baseline it is what the model itself may take. Also sets ``RLIMIT_CORE`` to
    0 (a crash leaves no core file) whatever ``max_memory`` is.
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    status = proc_status()
    vm, data = status.get("VmSize", 0), status.get("VmData", 0)
    if max_memory is None:
        return "unbounded", vm
    parts = []
    for name, base in (("RLIMIT_AS", vm), ("RLIMIT_DATA", data)):
        res = getattr(resource, name, None)
        if res is None:
            continue
        _soft, hard = resource.getrlimit(res)
        want = base + max_memory
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(res, (want, hard))
        parts.append(f"{name}={format_bytes(want)}")
    return (" ".join(parts) or "unbounded (no RLIMIT_AS here)"), vm


def env_for_worker(base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the caller's, with settings that keep the worker small
    (one extra malloc arena instead of eight per core: each reserves 64 MiB of address space,
    which RLIMIT_AS counts) and traceless (no ONNX Runtime telemetry, no .pyc writes)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env["ORT_DISABLE_TELEMETRY"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
