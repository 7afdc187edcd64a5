"""The scanner's side of the sandbox: start the model worker, ask it things, kill it.

Every request has a deadline; while it waits the scanner polls the socket every
``POLL_SECONDS``, so a deadline, a SIGINT or a SIGTERM turned into an exception (as the
command line does) ends the wait at once; the worker is then killed with SIGKILL and reaped.
Nothing the worker sends is unpickled: replies are JSON plus raw numbers (``protocol.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

from backdoorscan.sandbox import protocol
from backdoorscan.sandbox.export_cache import cache_read_paths
from backdoorscan.sandbox.limits import (
    IsolationStatus,
    Limits,
    ModelError,
    SandboxError,
    WorkerMemoryError,
    WorkerTimeout,
    env_for_worker,
    format_bytes,
    one_line,
    proc_status,
)
from backdoorscan.sandbox.worker import MEMORY_EXIT, TEST_HOOKS_ENV

POLL_SECONDS = 0.05
SOCKET_BUFFER = 4 << 20
_PASS_THROUGH = {"AdapterError", "ExtractionError"}  # messages already written for users


class NodeInfo(NamedTuple):
    """An input or output of a worker's session, as ``onnxruntime.NodeArg`` describes it."""

    name: str
    shape: list[int | str | None]
    type: str


def framework_of(path: str | Path) -> str:
    """``onnx``, ``torch``, ``keras`` or ``transformers`` (a folder): the library that reads
    the model file, by suffix (the rule ``adapters.load`` applies)."""
    from backdoorscan.adapters import KERAS_SUFFIXES, TORCH_SUFFIXES

    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():  # a Hugging Face model folder
        return "transformers"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    return "onnx"


class ModelWorker:
    """A worker process that loads, exports and runs one untrusted model, under ``limits``.

    Use it as a context manager; ``close()`` (or leaving the block, by an exception or
    Ctrl-C included) kills the worker. The worker process starts in ``start()``/``__enter__``
    and confines itself on the first request, after importing the libraries that request's
    model needs (``frameworks`` adds more up front, e.g. ``("torch",)``). A later request for a
    model of another framework restarts the worker when no session is open.

    After a :class:`WorkerTimeout`, a :class:`WorkerMemoryError`, a crash or an interrupt the
    worker is gone and every further request raises :class:`SandboxError`.
    """

    def __init__(self, limits: Limits | None = None, *, frameworks: Iterable[str] = ()) -> None:
        self.limits = limits or Limits()
        self._frameworks = set(frameworks)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._log: Any = None
        self._status: IsolationStatus | None = None
        self._setup_frameworks: set[str] = set()
        self._sessions: set[int] = set()
        self._killed = False
        self._dead: str | None = None
        self._peak = 0
        self._inherited = 0  # the scanner's high-water RSS when it started the worker
        self._preload: set[str] = set()
        self._lock = threading.RLock()  # one request at a time on the socket
        self._extra_read: set[str] = set()
        self._sys_path: set[str] = set()  # folders the worker imports --arch modules from

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> ModelWorker:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker process (it imports nothing of the model's yet)."""
        if self._proc is not None:
            return
        parent, child = socket.socketpair()
        for s in (parent, child):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        env = env_for_worker()
        # numpy's BLAS threads would predate Landlock; the model runs in ONNX Runtime or torch.
        env["OPENBLAS_NUM_THREADS"] = "1"
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "backdoorscan.sandbox.worker",
                    str(child.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                env=env,
                start_new_session=True,  # no controlling terminal; Ctrl-C reaches the scanner
            )
        finally:
            child.close()
        # Linux copies the parent's high-water RSS into a child at fork and exec, so the
        # worker's ru_maxrss is at least the scanner's peak so far (see _reaped_peak).
        self._inherited = proc_status().get("VmHWM", 0)
        parent.settimeout(POLL_SECONDS)
        self._sock = parent
        self._killed = False
        self._dead = None
        self._status = None

    def close(self) -> None:
        """Kill the worker (SIGKILL), reap it and release the socket and log. Idempotent."""
        proc, sock = self._proc, self._sock
        self._sample()  # while its memory is still there to read: a goodbye may end it first
        if sock is not None and proc is not None and proc.returncode is None and not self._dead:
            with contextlib.suppress(Exception):  # a polite goodbye; the kill follows anyway
                sock.settimeout(0)
                protocol.send(sock, {"op": "bye"})
        self._kill()
        if sock is not None:
            sock.close()
        if self._log is not None:
            self._log.close()
        self._proc = self._sock = self._log = None
        self._sessions.clear()

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before ``start``)."""
        return None if self._proc is None else self._proc.pid

    @property
    def status(self) -> IsolationStatus | None:
        """What confinement the worker really got (None until its first request)."""
        return self._status

    @property
    def peak_rss(self) -> int:
        """The worker's largest resident size in bytes, as the kernel counts it: the
        high-water mark of its own memory (``VmHWM``), read while waiting for each reply and
        just before the worker is killed; the reaped worker's ``ru_maxrss`` where that is
        larger than what the worker inherited (Linux starts a child's ``ru_maxrss`` at its
        parent's high-water mark, so below that it says nothing about the worker)."""
        return self._peak

    # -- requests ----------------------------------------------------------------------------

    def export(self, model_path: str | Path, layer: str | None = None, **options: Any) -> Any:
        """``adapters.load(model_path, **options).to_onnx(layer)``, in the worker; returns an
        :class:`~backdoorscan.adapters.base.OnnxExport` rebuilt from checked JSON and bytes."""
        path = self._model_path(model_path, options)
        reply, bufs = self._request(
            {"op": "export", "path": path, "layer": layer, "options": options},
            (),
            f"exporting {Path(path).name}",
        )
        if len(bufs) != 1 or not isinstance(bufs[0], bytes):
            raise self._malformed("an export without its model bytes")
        return protocol.export_from_fields(reply.get("export"), bufs[0])

    def layers(self, model_path: str | Path, **options: Any) -> list[Any]:
        """``adapters.load(model_path, **options).layers()``, in the worker: a list of
        :class:`~backdoorscan.adapters.base.LayerInfo`."""
        path = self._model_path(model_path, options)
        reply, _ = self._request(
            {"op": "layers", "path": path, "options": options},
            (),
            f"listing the layers of {Path(path).name}",
        )
        return self._layer_rows(reply)

    def _layer_rows(self, reply: dict[str, Any]) -> list[Any]:
        """The checked ``layers`` table of a reply, as ``LayerInfo`` rows."""
        from backdoorscan.adapters.base import LayerInfo

        rows = protocol.expect(reply.get("layers"), list, "layers")
        out = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4):
                raise self._malformed("a layer row")
            name, op, shape, default = row
            protocol.expect(name, str, "layer name")
            protocol.expect(op, str, "layer type")
            protocol.expect(default, bool, "layer default")
            out.append(LayerInfo(name, op, _shape(shape), default))
        return out

    def session(
        self, export: Any, device: str = "auto", threads: int | None = None
    ) -> SessionProxy:
        """``runtime.make_session(export, device, threads=threads, spin=False)``, in the worker;
        returns a proxy with ``run`` and ``get_providers`` like an ``InferenceSession``."""
        self._ensure_setup("onnx")
        reply, _ = self._request(
            {
                "op": "session",
                "export": protocol.export_fields(export),
                "device": device,
                "threads": threads,
            },
            [export.model_bytes],
            "creating the ONNX Runtime session",
        )
        sid = protocol.expect(reply.get("sid"), int, "session id")
        providers = protocol.expect(reply.get("providers"), list, "providers")
        for p in providers:
            protocol.expect(p, str, "provider")
        self._sessions.add(sid)
        return SessionProxy(
            self, sid, providers, _nodes(reply.get("inputs")), _nodes(reply.get("outputs"))
        )

    def _call(self, target: str, *args: Any) -> Any:
        """Test hook: import and call ``module:function`` in the worker (JSON in and out).
        The worker honours it only when started with ``BACKDOORSCAN_SANDBOX_TEST_HOOKS=1``."""
        self._ensure_setup("onnx")
        reply, _ = self._request(
            {"op": "_call", "target": target, "args": list(args)}, (), f"calling {target}"
        )
        return reply.get("result")

    # -- machinery ---------------------------------------------------------------------------

    def _model_path(self, model_path: str | Path, options: Mapping[str, Any]) -> str:
        path = str(Path(model_path).expanduser().resolve())
        arch = options.get("arch")
        if isinstance(arch, str) and ":" in arch:
            self._trust_arch(arch.partition(":")[0])
        self._ensure_setup(framework_of(path))
        if (
            self.limits.landlock
            and self.limits.allow_read
            and not any(
                path == a or path.startswith(a.rstrip("/") + "/") for a in self.limits.allow_read
            )
        ):
            raise SandboxError(
                f"{Path(path).name} is outside the folders the model worker may read "
                "(Limits.allow_read)"
            )
        return path

    def _trust_arch(self, module: str) -> None:
        """Let the worker import ``--arch`` code (the user's, trusted): preload it, allow
        reading the module (its file, or its package's folders) and listing, not reading,
        the ``sys.path`` folder this process found it in, which the worker's ``sys.path``
        gains (where this process has it through ``sys.path.insert``, not ``PYTHONPATH``)."""
        try:
            spec = importlib.util.find_spec(module.split(".")[0])
        except (ImportError, ValueError):
            return
        if spec is None:
            return
        if spec.submodule_search_locations:
            locations = [str(Path(p).resolve()) for p in spec.submodule_search_locations]
            self._extra_read.update(locations)
            self._sys_path.update(str(Path(p).parent) for p in locations)
        elif spec.origin and Path(spec.origin).is_file():
            origin = Path(spec.origin).resolve()
            self._extra_read.add(str(origin))
            self._sys_path.add(str(origin.parent))
        self._preload.add(module)

    def _ensure_setup(self, framework: str) -> None:
        # Every worker imports ONNX Runtime; torch and keras only when a model needs them.
        want = self._frameworks | self._setup_frameworks | {framework, "onnx"}
        if self._status is not None and want <= self._setup_frameworks:
            return
        if self._status is not None:
            if self._sessions:
                raise SandboxError(
                    f"this model worker was set up for {', '.join(sorted(self._setup_frameworks))}"
                    f"; a {framework} model needs a new ModelWorker"
                )
            self.close()
        self.start()
        lim = self.limits
        msg = {
            "op": "setup",
            "frameworks": sorted(want),
            "max_memory": lim.max_memory,
            # The export cache: read-only, so the worker is served from it (export_cache.py).
            "allow_read": [*lim.allow_read, *sorted(self._extra_read), *cache_read_paths()],
            "seccomp": lim.seccomp,
            "landlock": lim.landlock,
            "trust": lim.trust,
            "preload": sorted(self._preload),
            "sys_path": sorted(self._sys_path),
        }
        reply, _ = self._request(msg, (), "starting the model worker", setup=True)
        st = protocol.expect(reply.get("status"), dict, "status")
        self._status = IsolationStatus(
            seccomp=protocol.expect(st.get("seccomp"), str, "status"),
            landlock=protocol.expect(st.get("landlock"), str, "status"),
            memory=protocol.expect(st.get("memory"), str, "status"),
            baseline_vm=protocol.expect(st.get("baseline_vm"), int, "status"),
            frameworks=tuple(str(f) for f in protocol.expect(st.get("frameworks"), list, "")),
        )
        self._setup_frameworks = want

    def _max_reply(self) -> int:
        if self.limits.max_memory is None:
            return 16 << 30
        return max(self.limits.max_memory, 64 << 20) + (1 << 30)

    def _request(
        self, header: dict[str, Any], buffers: Sequence[Any], what: str, setup: bool = False
    ) -> tuple[dict[str, Any], list[Any]]:
        """Send one request, wait for its reply within the deadline; raise its error. One
        request at a time: the scanner asks from several threads (one per class), and the
        socket carries one conversation."""
        with self._lock:
            return self._request_one(header, buffers, what, setup)

    def _request_one(
        self, header: dict[str, Any], buffers: Sequence[Any], what: str, setup: bool
    ) -> tuple[dict[str, Any], list[Any]]:
        if self._dead:
            raise SandboxError(f"the model worker is gone ({self._dead}); start a new one")
        if self._proc is None or self._sock is None:
            self.start()
        if not setup and header.get("op") not in {"bye"} and self._status is None:
            self._ensure_setup("onnx")
        assert self._sock is not None
        timeout = self.limits.timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        def wait() -> None:
            self._sample()
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                self._dead = "stopped after --timeout"
                raise WorkerTimeout(
                    f"the model took longer than --timeout {timeout:g}s while {what}; "
                    "it was stopped"
                )

        try:
            protocol.send(self._sock, header, buffers, wait)
            reply, bufs = protocol.recv(self._sock, self._max_reply(), wait)
        except (EOFError, ConnectionError, BrokenPipeError):
            raise self._died(what) from None
        except protocol.ProtocolError as exc:
            self._kill()
            self._dead = "sent a malformed reply"
            raise SandboxError(
                f"the model worker sent a malformed reply while {what} ({exc}); it was stopped"
            ) from None
        except BaseException:  # timeout, interrupt, anything: the stream is out of step
            self._kill()
            self._dead = self._dead or "interrupted"
            raise
        if not reply.get("ok"):
            raise self._error(reply, what, setup)
        return reply, bufs

    def _error(self, reply: dict[str, Any], what: str, setup: bool) -> SandboxError:
        kind = str(reply.get("type", "Exception"))[:60]
        msg = one_line(str(reply.get("message", ""))) or kind
        if setup:
            self._kill()
            self._dead = "could not confine itself"
            return SandboxError(msg)
        if reply.get("memory") is True:
            return self._memory_error(what, msg)
        return ModelError(msg if kind in _PASS_THROUGH else f"{kind}: {msg}", kind=kind)

    def _memory_error(self, what: str, detail: str) -> WorkerMemoryError:
        lim = self.limits.max_memory
        if lim is None:
            return WorkerMemoryError(f"the model ran out of memory while {what} ({detail})")
        return WorkerMemoryError(
            f"the model needs more memory than --max-memory {format_bytes(lim)} allows while "
            f"{what} ({detail}); raise --max-memory if you trust it"
        )

    def _died(self, what: str) -> SandboxError:
        """The worker closed the socket mid-request: reap it and say how it ended."""
        self._kill(signal_it=False)
        rc = None if self._proc is None else self._proc.returncode
        tail = self._log_tail()
        self._dead = f"exit status {rc}"
        if rc == -signal.SIGKILL or rc == MEMORY_EXIT or is_oom_text(tail):
            return self._memory_error(what, tail or "killed by the kernel")
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name
            if -rc == signal.SIGSYS:
                return SandboxError(
                    f"the model made a system call the sandbox forbids ({name}) while {what}"
                )
            return SandboxError(
                f"the model worker crashed ({name}) while {what}" + (f": {tail}" if tail else "")
            )
        return SandboxError(
            f"the model worker exited (status {rc}) while {what}" + (f": {tail}" if tail else "")
        )

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 4096))
            lines = self._log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        last = next((ln for ln in reversed(lines) if ln.strip()), "")
        return one_line(last, 200)

    def _malformed(self, what: str) -> SandboxError:
        self._kill()
        self._dead = "sent a malformed reply"
        return SandboxError(f"the model worker sent a malformed reply ({what}); it was stopped")

    def _sample(self) -> None:
        if self._proc is not None:
            self._peak = max(self._peak, proc_status(self._proc.pid).get("VmHWM", 0))

    def _kill(self, signal_it: bool = True) -> None:
        """SIGKILL the worker (unless it is already gone) and reap it, recording its peak RSS."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self._sample()
        if signal_it:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self._killed = True
        end = time.monotonic() + 2.0
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:
                proc.returncode = proc.returncode if proc.returncode is not None else -9
                return
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                self._peak = max(self._peak, self._reaped_peak(usage.ru_maxrss * 1024))
                return
            if time.monotonic() > end:
                return  # stuck in the kernel; Popen reaps it later
            if not signal_it and time.monotonic() > end - 1.5:
                # It closed the socket but lives on: no more waiting, kill it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.005)

    def _reaped_peak(self, maxrss: int) -> int:
        """The worker's own peak from its ``ru_maxrss``, or 0 where that figure may be the
        scanner's. At exec the kernel sets a process's maxrss to the high-water mark of the
        memory it replaces (``exec_mmap``), which for a child forked (or vforked, as
        ``subprocess`` does) from the scanner is the scanner's: a test suite at 1 GiB made a
        worker bounded at 350 MiB report 1 GiB. Above that mark the figure is the worker's."""
        return maxrss if maxrss > self._inherited else 0


def is_oom_text(text: str) -> bool:
    """Whether the worker's last log line says an allocation failed."""
    from backdoorscan.sandbox.worker import _OOM_MARKERS

    low = text.lower()
    return "memoryerror" in low or any(m in low for m in _OOM_MARKERS)


class SessionProxy:
    """An ONNX Runtime session living in the worker: ``run`` sends the feeds as raw numbers and
    returns the outputs as numpy arrays, like ``InferenceSession.run``."""

    def __init__(
        self,
        worker: ModelWorker,
        sid: int,
        providers: list[str],
        inputs: list[NodeInfo],
        outputs: list[NodeInfo],
    ) -> None:
        self._worker = worker
        self._sid = sid
        self._providers = providers
        self._inputs = inputs
        self._outputs = outputs

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: object = None,
    ) -> list[np.ndarray]:
        """The outputs named (all when None) for ``input_feed``. ``run_options`` is accepted
        for compatibility and ignored: the worker runs with logging off and raises errors."""
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        feeds = list(input_feed)
        arrays = [np.asarray(input_feed[k]) for k in feeds]
        _, outs = self._worker._request(
            {"op": "run", "sid": self._sid, "names": names, "feeds": feeds},
            arrays,
            "running the model",
        )
        if len(outs) != len(names) or not all(isinstance(o, np.ndarray) for o in outs):
            raise self._worker._malformed("outputs")
        return outs

    def get_providers(self) -> list[str]:
        """The execution providers the worker's session really uses, in priority order."""
        return list(self._providers)

    def get_inputs(self) -> list[NodeInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeInfo]:
        return list(self._outputs)

    def close(self) -> None:
        """Free the session in the worker (leaving the worker's block frees everything)."""
        w = self._worker
        if self._sid in w._sessions and not w._dead and w._sock is not None:
            w._request({"op": "close_session", "sid": self._sid}, (), "closing a session")
        w._sessions.discard(self._sid)


def _shape(shape: Any) -> tuple[int | str | None, ...]:
    protocol.expect(shape, list, "shape")
    for d in shape:
        if d is not None and not isinstance(d, str):
            protocol.expect(d, int, "shape")
    return tuple(shape)


def _nodes(rows: Any) -> list[NodeInfo]:
    protocol.expect(rows, list, "session inputs/outputs")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3):
            raise protocol.ProtocolError("malformed reply: node")
        out.append(
            NodeInfo(
                protocol.expect(row[0], str, "node"),
                list(_shape(row[1])),
                protocol.expect(row[2], str, "node"),
            )
        )
    return out


__all__ = ["TEST_HOOKS_ENV", "ModelWorker", "NodeInfo", "SessionProxy", "framework_of"]
