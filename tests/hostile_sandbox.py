"""Hostile payloads for the sandbox tests: models that exhaust memory, never finish or write
files, and functions that play the attacker's code inside the worker.

The functions under "inside the worker" are imported and called by the worker through its
test hook (``ModelWorker._call``); each tries one thing the sandbox must refuse and reports
what happened as JSON, so the test can check both the outcome and the absence of its mark.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np

# -- ONNX models ---------------------------------------------------------------------------------


def _model(nodes: list, extra_init: list | None = None) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4]),
        ],
        extra_init or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def memory_bomb(n_floats: int = 1 << 28) -> bytes:
    """A few hundred bytes of ONNX whose run allocates ``n_floats`` float32 (1 GiB by default):
    the input's sum expanded to that many elements. The shape depends on the input, so ONNX
    Runtime cannot fold it away when the session is made; the allocation happens in ``run``."""
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([n_floats], dtype=np.int64), "big_shape")
    return _model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Expand", ["s", "big_shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["t"], keepdims=1),
            helper.make_node("Mul", ["x", "t"], ["features"]),
            helper.make_node("Identity", ["features"], ["logits"]),
        ],
        [shape],
    )


def endless_loop(trip_count: int = 1 << 62) -> bytes:
    """An ONNX ``Loop`` adding one to a counter ``trip_count`` times: one ``run`` that never
    ends (ONNX Runtime checks no signal while it is inside)."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    inits = [
        numpy_helper.from_array(np.array(trip_count, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    return _model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Loop", ["trips", "cond", "s"], ["n"], body=body),
            helper.make_node("Mul", ["x", "n"], ["features"]),
            helper.make_node("Identity", ["features"], ["logits"]),
        ],
        inits,
    )


def export_of(model_bytes: bytes) -> object:
    """An OnnxExport for one of the models above (input ``x``, 4 floats per sample)."""
    from backdoorscan.adapters.base import OnnxExport

    return OnnxExport(model_bytes, "x", (4,), "float32", "features", 4, 4)


# -- TorchScript ---------------------------------------------------------------------------------


def torchscript_writer(path: Path, marker: Path) -> Path:
    """A TorchScript archive whose ``forward`` maps ``marker`` with ``aten::from_file(...,
    shared=True)``, which creates the file (the issue's write primitive). Exporting the model
    runs ``forward``."""
    import torch

    class Writer(torch.nn.Module):
        def __init__(self, target: str) -> None:
            super().__init__()
            self.target = target
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.ops.aten.from_file(self.target, True, 16)
            return self.lin(x) + t.sum() * 0

    torch.jit.save(torch.jit.script(Writer(str(marker))), str(path))
    return path


def torchscript_setstate_writer(path: Path, marker: Path) -> Path:
    """A TorchScript archive whose ``__setstate__`` maps ``marker`` with ``aten::from_file(...,
    shared=True)``: ``torch.jit.load`` itself creates the file, before any check of the loaded
    code can run (only the worker's confinement stops it)."""
    import torch

    class Writer(torch.nn.Module):
        def __init__(self, target: str) -> None:
            super().__init__()
            self.target = target
            self.weight = torch.nn.Parameter(torch.randn(4, 3))

        @torch.jit.export
        def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
            return (self.target, self.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
            self.target = state[0]
            self.training = state[2]
            # Used in the result, so that TorchScript does not drop the call as dead code.
            self.weight = state[1] + torch.ops.aten.from_file(self.target, True, 16).sum() * 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    torch.jit.save(torch.jit.script(Writer(str(marker))), str(path))
    return path


def run_torchscript_unsandboxed(path: Path) -> None:
    """Load and run the archive with plain torch (the control: the payload is live)."""
    import torch

    torch.jit.load(str(path))(torch.zeros(1, 4))


# -- inside the worker (called through the test hook) --------------------------------------------


def write_file(path: str) -> str:
    with open(path, "w") as f:
        f.write("pwned")
    return "written"


def append_file(path: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"pwned")
    os.close(fd)
    return "written"


def system(marker: str) -> int:
    """``os.system`` returns the shell's status, or -1 when no process could be started."""
    return os.system(f"touch {marker}")


def run_program(marker: str) -> str:
    subprocess.run(["/usr/bin/touch", marker], check=True)
    return "ran"


def fork() -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "forked"


def open_socket() -> str:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    return "socket"


def read_file(path: str) -> str:
    return Path(path).read_text()


def remove_file(path: str) -> str:
    os.unlink(path)
    return "removed"


def start_thread() -> str:
    """Threads must keep working: ONNX Runtime and torch need them."""
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(sum(range(1000))))
    t.start()
    t.join()
    return f"thread {box[0]}"


def die_by_sigkill() -> None:
    """What the kernel's OOM killer does to a process."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def allocate(n_bytes: int) -> int:
    """Touch ``n_bytes`` of memory from Python."""
    return len(bytearray(n_bytes))


def send_pickle(marker: str) -> str:
    """Write a pickle, framed as a reply header, on the worker's socket to the scanner: if the
    scanner unpickled it, it would create ``marker``. Then let the real reply follow."""
    import pickle
    import struct

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    blob = pickle.dumps(Payload())
    _worker_socket().sendall(struct.pack("<Q", len(blob)) + blob)
    return "sent"


def send_lying_header() -> str:
    """A well-formed JSON reply whose buffer claims a dtype that is not a number."""
    import json
    import struct

    head = json.dumps({"ok": True, "buffers": [{"dtype": "object", "shape": [1]}]}).encode()
    _worker_socket().sendall(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    return "sent"


def _worker_socket() -> socket.socket:
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, socket.socket) and obj.fileno() >= 0:
            return socket.socket(fileno=os.dup(obj.fileno()))
    raise RuntimeError("no socket")
