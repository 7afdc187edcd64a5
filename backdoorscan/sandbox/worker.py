"""The model worker: the only process that parses or runs an untrusted model.

Started by :class:`backdoorscan.sandbox.ModelWorker` as ``python -m backdoorscan.sandbox.worker
FD PARENT_PID``, with one end of a Unix socket pair as ``FD``. It confines itself in this
order, before it has read a byte of any model:

1. dies with its parent (``PR_SET_PDEATHSIG``), ignores SIGINT (the scanner decides), keeps
   its log file small (``RLIMIT_FSIZE``) and leaves no core file;
2. reads the scanner's setup message (limits, folders, frameworks);
3. Landlock: reads only beneath the allowed folders, Python's and the system libraries';
   applied while the worker is still one thread, because Landlock (unlike seccomp) confines
   only the calling thread and the ones it starts later;
4. seccomp: no exec, fork, sockets, file writes or kernel back doors (``seccomp.py``);
5. imports numpy, ONNX, ONNX Runtime, the model's framework and backdoorscan's adapters
   (imports only read files, which both layers allow; this is where libraries start threads);
6. measures its own size and sets ``RLIMIT_AS``/``RLIMIT_DATA`` to it plus ``max_memory``;

then answers requests (export, layers, session, run, and ``model_*`` on a model it keeps
for retraining: ``hosted.py``) until the scanner says goodbye or goes
away. Replies carry JSON and raw numbers only (``protocol.py``); errors are one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import os
import resource
import signal
import socket
import sys
import tempfile
from typing import Any

from backdoorscan.sandbox import protocol
from backdoorscan.sandbox.hosted import OPS as HOSTED_OPS
from backdoorscan.sandbox.hosted import HostedModels, layer_table
from backdoorscan.sandbox.limits import apply_memory_limit, one_line, proc_status

LOG_LIMIT = 8 << 20  # bytes the worker may write to its log (stdout and stderr)
MEMORY_EXIT = 86  # exit status of a worker that ran out of memory outside a request
TEST_HOOKS_ENV = "BACKDOORSCAN_SANDBOX_TEST_HOOKS"
_PR_SET_PDEATHSIG = 1
_OOM_MARKERS = (
    "bad_alloc",
    "failed to allocate",
    "cannot allocate memory",
    "can't allocate memory",
    "out of memory",
)

FRAMEWORK_MODULES = {
    "onnx": ("backdoorscan.adapters.onnx",),
    "torch": ("torch", "torch.onnx", "backdoorscan.adapters.torch"),
    "keras": ("keras", "backdoorscan.adapters.keras"),
    "transformers": (
        "torch",
        "torch.onnx",
        "transformers",
        "backdoorscan.adapters.torch",
        "backdoorscan.adapters.hf",
    ),
}
BASE_MODULES = (
    "numpy",
    "onnx",
    "onnxruntime",
    "backdoorscan.adapters",
    "backdoorscan.runtime",
)


def is_memory_error(exc: BaseException) -> bool:
    """Whether an exception means an allocation failed (Python's, ONNX Runtime's, torch's)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return any(m in text for m in _OOM_MARKERS)


class Worker:
    """Serves one scanner over ``sock``; holds the ONNX Runtime sessions it created."""

    def __init__(self, sock: socket.socket, test_hooks: bool) -> None:
        self.sock = sock
        self.sessions: dict[int, tuple[Any, Any]] = {}
        self.next_sid = 1
        self.hosted = HostedModels()  # retrainable models kept here (repair, ExRe 'full')
        self.test_hooks = test_hooks

    # -- setup -------------------------------------------------------------------------------

    def setup(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Confine the process as ``msg`` asks, import the libraries, set the memory limit."""
        # Libraries ask tempfile for its folder as they import (torch's export machinery does);
        # tempfile finds it by writing a probe file in each candidate, which fails once writes
        # are refused, and then raises "no usable temporary directory". Name it up front,
        # unprobed: a file written there is refused like any other.
        tempfile.tempdir = os.environ.get("TMPDIR") or "/tmp"
        # torch's optimisers reach its compiler's cache folder on first use, and make it when
        # missing (refused here: no mkdir). Point it at a folder that exists; writes into it
        # stay refused like any other.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.tempdir
        landlock_status = "off"
        if msg.get("landlock", True):
            from backdoorscan.sandbox import landlock

            try:
                paths = [*landlock.default_read_paths(), *msg.get("allow_read", [])]
                if "keras" in msg.get("frameworks", []):
                    paths.append(keras_config())
                threads = proc_status().get("Threads", 1)
                abi = landlock.restrict(paths, msg.get("sys_path", []))
                landlock_status = f"on (ABI {abi})"
                if threads > 1:
                    landlock_status += f", {threads - 1} earlier threads not covered"
            except landlock.LandlockError as exc:
                landlock_status = f"unavailable: {exc}"
        seccomp_status = "off"
        if msg.get("seccomp", True):
            from backdoorscan.sandbox import seccomp

            try:
                rules = seccomp.install()
                seccomp_status = f"on ({rules} rules)"
            except seccomp.SeccompError as exc:
                if not msg.get("trust", False):
                    raise SetupError(
                        f"cannot isolate the model: {exc}; pass --trust-model to run it "
                        "without the system-call filter"
                    ) from None
                seccomp_status = f"unavailable: {exc}"
        frameworks = [f for f in msg.get("frameworks", []) if f in FRAMEWORK_MODULES]
        for name in [*BASE_MODULES, *(m for f in frameworks for m in FRAMEWORK_MODULES[f])]:
            # A missing framework: the adapter says so, in its own words, when it is needed.
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        # Where the scanner found the --arch module: after the worker's own entries, so that it
        # never shadows a library.
        sys.path.extend(p for p in msg.get("sys_path", []) if p not in sys.path)
        for name in msg.get("preload", []):
            # Trusted code named by --arch: its error, if any, comes with the load.
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        memory, baseline = apply_memory_limit(msg.get("max_memory"))
        return {
            "seccomp": seccomp_status,
            "landlock": landlock_status,
            "memory": memory,
            "baseline_vm": baseline,
            "frameworks": frameworks,
        }

    # -- requests ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until the scanner says ``bye`` or closes the socket."""
        while True:
            try:
                msg, bufs = protocol.recv(self.sock, 1 << 62)
            except (EOFError, ConnectionError):
                return
            op = msg.get("op")
            if op == "bye":
                return
            try:
                header, out = self.handle(op, msg, bufs)
                reply = {"ok": True, **header}
            except BaseException as exc:  # every failure becomes a one-line reply
                out = []
                text = one_line(str(exc)) or type(exc).__name__
                reply = {
                    "ok": False,
                    "type": type(exc).__name__,
                    "memory": is_memory_error(exc),
                    "message": text,
                }
            try:
                protocol.send(self.sock, reply, out)
            except protocol.ProtocolError as exc:  # e.g. an output of a non-number dtype
                protocol.send(
                    self.sock,
                    {"ok": False, "type": "ProtocolError", "memory": False, "message": str(exc)},
                )

    def handle(self, op: Any, msg: dict[str, Any], bufs: list) -> tuple[dict[str, Any], list]:
        if op == "export":
            from backdoorscan import adapters

            adapter = adapters.load(msg["path"], **msg.get("options", {}))
            export = adapter.to_onnx(msg.get("layer"))
            # The scanner has no adapter to ask which framework the model is in: the export says.
            export.framework = str(getattr(adapter, "framework", export.framework))
            return {"export": protocol.export_fields(export)}, [export.model_bytes]
        if op == "layers":
            from backdoorscan import adapters

            rows = adapters.load(msg["path"], **msg.get("options", {})).layers()
            return {"layers": layer_table(rows)}, []
        if op == "tokenize":  # a model folder's tokenizer.json, on the scanner's texts
            from backdoorscan.adapters import hf

            ids, pad, special, cut = hf.tokenize(
                msg["path"], msg["texts"], msg["max_length"], msg.get("pad")
            )
            return {"pad": pad, "special": special, "truncated": cut}, [ids]
        if op == "session":
            return self.open_session(msg, bufs), []
        if op == "run":
            return self.run(msg, bufs)
        if op in HOSTED_OPS:
            return self.hosted.handle(op, msg, bufs)
        if op == "close_session":
            self.sessions.pop(int(msg["sid"]), None)
            return {}, []
        if op == "_call" and self.test_hooks:
            mod, _, attr = str(msg["target"]).partition(":")
            result = getattr(importlib.import_module(mod), attr)(*msg.get("args", []))
            return {"result": result}, []
        raise ValueError(f"unknown request {str(op)[:40]!r}")

    def open_session(self, msg: dict[str, Any], bufs: list) -> dict[str, Any]:
        import onnxruntime as ort

        from backdoorscan.adapters.base import OnnxExport
        from backdoorscan.runtime import make_session

        fields = dict(msg["export"])
        fields["input_shape"] = tuple(fields["input_shape"])
        export = OnnxExport(model_bytes=bytes(bufs[0]), **fields)
        # Idle threads park instead of spinning: the next batch comes after a round trip to
        # the scanner, and spinning through it burns the cores the scanner needs for it
        # (measured on 2 cores: +27-38 % CPU for an MNIST pass; benchmarks/RESULTS.md).
        session: Any = make_session(
            export, msg.get("device", "auto"), threads=msg.get("threads"), spin=False
        )
        options = ort.RunOptions()
        options.log_severity_level = 4
        sid = self.next_sid
        self.next_sid += 1
        self.sessions[sid] = (session, options)

        def info(args: Any) -> list:
            return [
                [a.name, [d if isinstance(d, int | str) else None for d in a.shape], a.type]
                for a in args
            ]

        return {
            "sid": sid,
            "providers": list(session.get_providers()),
            "inputs": info(session.get_inputs()),
            "outputs": info(session.get_outputs()),
        }

    def run(self, msg: dict[str, Any], bufs: list) -> tuple[dict[str, Any], list]:
        import numpy as np

        session, options = self.sessions[int(msg["sid"])]
        feed = dict(zip(msg["feeds"], bufs, strict=True))
        outs = session.run(msg["names"], feed, options)
        arrays = []
        for name, out in zip(
            msg["names"] or [o.name for o in session.get_outputs()], outs, strict=True
        ):
            if not isinstance(out, np.ndarray) or out.dtype.name not in protocol.DTYPES:
                kind = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
                raise TypeError(f"the model's output {name!r} is {kind}, not a tensor of numbers")
            arrays.append(out)
        return {}, arrays


def keras_config() -> str:
    """The Keras settings file that ``import keras`` reads (and that it cannot be kept from
    reading: a refusal to open it is not caught there): ``$KERAS_HOME/keras.json``, else
    ``~/.keras/keras.json``, or ``/tmp/.keras/keras.json`` where the home is not writable.
    Keras' own rule (``keras/src/backend/config.py``); only that file is allowed."""
    if "KERAS_HOME" in os.environ:
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.expanduser(os.path.join(folder, "keras.json"))


class SetupError(RuntimeError):
    """The worker cannot confine itself as asked; the scanner is told why, then it exits."""


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the scanner dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full log gives EFBIG, not death
    resource.setrlimit(resource.RLIMIT_FSIZE, (LOG_LIMIT, LOG_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sock = socket.socket(fileno=fd)
    worker = Worker(sock, test_hooks)
    try:
        msg, _ = protocol.recv(sock, 1 << 20)
        try:
            status = worker.setup(msg)
        except SetupError as exc:
            protocol.send(
                sock, {"ok": False, "type": "SetupError", "memory": False, "message": str(exc)}
            )
            return 1
        protocol.send(sock, {"ok": True, "status": status})
        worker.serve()
    except (EOFError, ConnectionError):
        return 0
    except MemoryError:
        return MEMORY_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
