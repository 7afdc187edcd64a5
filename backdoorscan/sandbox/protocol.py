"""Wire format between the scanner and its model worker: a JSON header, then raw array bytes.

The worker runs code an untrusted model shapes, so whatever it sends is hostile input: the
scanner never unpickles it. A message is

    8 bytes   little-endian length of the header
    header    a UTF-8 JSON object, at most ``MAX_HEADER`` bytes, with a ``buffers`` list
    buffers   for each entry ``{"dtype": name, "shape": [...]}`` of that list, exactly
              ``prod(shape) * itemsize`` raw bytes, C order

``dtype`` is one of the numeric names in ``DTYPES`` or ``"bytes"`` (a 1-D run of bytes, e.g. a
serialized ONNX model). The receiver checks every field, computes each buffer's size from the
header (never from a length the peer sends), refuses totals over its byte budget, and reads
straight into the array's own memory (``recv_into``), so a batch costs one copy per direction.

Both directions use the same format; the worker trusts the scanner, the scanner does not trust
the worker. Deadlines and interruption are the caller's: the receive functions take a
``wait`` callable invoked whenever the socket has nothing to read (see ``client.py``).
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backdoorscan.sandbox.limits import SandboxError

MAX_HEADER = 1 << 20
MAX_BUFFERS = 64
MAX_NDIM = 32
DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
_LEN = struct.Struct("<Q")

Payload = np.ndarray | bytes | bytearray | memoryview
WaitFn = Callable[[], None]


class ProtocolError(SandboxError):
    """The peer sent something that is not a well-formed message; the connection is unusable."""


def describe(buf: Payload) -> tuple[dict[str, Any], memoryview]:
    """The header entry and the raw bytes of one buffer to send."""
    if isinstance(buf, np.ndarray):
        if buf.dtype.name not in DTYPES:
            raise ProtocolError(f"cannot send an array of dtype {buf.dtype}, only numbers")
        arr = np.ascontiguousarray(buf)
        raw = memoryview(arr.reshape(-1).view(np.uint8))
        return {"dtype": arr.dtype.name, "shape": list(arr.shape)}, raw
    raw = memoryview(buf).cast("B")
    return {"dtype": "bytes", "shape": [raw.nbytes]}, raw


def send(
    sock: socket.socket,
    header: dict[str, Any],
    buffers: Sequence[Payload] = (),
    wait: WaitFn | None = None,
) -> None:
    """Send one message; ``wait`` is called whenever the socket would block (it may raise)."""
    descs, raws = [], []
    for b in buffers:
        d, r = describe(b)
        descs.append(d)
        raws.append(r)
    head = json.dumps({**header, "buffers": descs}, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError("message header too large")
    _send_all(sock, memoryview(_LEN.pack(len(head)) + head), wait)
    for r in raws:
        _send_all(sock, r, wait)


def _send_all(sock: socket.socket, data: memoryview, wait: WaitFn | None) -> None:
    sent = 0
    while sent < data.nbytes:
        try:
            sent += sock.send(data[sent:])
        except (TimeoutError, BlockingIOError):
            if wait is None:
                raise
            wait()


def _recv_into(sock: socket.socket, view: memoryview, wait: WaitFn | None) -> None:
    got = 0
    while got < view.nbytes:
        try:
            n = sock.recv_into(view[got:])
        except (TimeoutError, BlockingIOError):
            if wait is None:
                raise
            wait()
            continue
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n


def recv(
    sock: socket.socket, max_bytes: int, wait: WaitFn | None = None
) -> tuple[dict[str, Any], list[np.ndarray | bytes]]:
    """Receive one message: its header (a dict) and its buffers, numeric ones as writable
    numpy arrays, ``"bytes"`` ones as bytes. Raises :class:`ProtocolError` on anything
    malformed or larger than ``max_bytes`` in all, ``EOFError`` when the peer is gone."""
    size = bytearray(_LEN.size)
    _recv_into(sock, memoryview(size), wait)
    (n,) = _LEN.unpack(size)
    if n > MAX_HEADER:
        raise ProtocolError(f"message header of {n} bytes (the limit is {MAX_HEADER})")
    head = bytearray(n)
    _recv_into(sock, memoryview(head), wait)
    header = parse_header(bytes(head))
    specs = [_buffer_spec(d) for d in header["buffers"]]
    total = sum(nbytes for _, _, nbytes in specs)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}")
    out: list[np.ndarray | bytes] = []
    for dtype, shape, nbytes in specs:
        # np.empty, not bytearray: pages are committed as bytes arrive, so a size the peer
        # declares but never sends costs nothing.
        raw = np.empty(nbytes, dtype=np.uint8)
        _recv_into(sock, memoryview(raw), wait)
        out.append(raw.tobytes() if dtype == "bytes" else raw.view(np.dtype(dtype)).reshape(shape))
    return header, out


def parse_header(raw: bytes) -> dict[str, Any]:
    """Decode a header: a JSON object with a ``buffers`` list. Nothing but JSON is decoded."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed message header ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("buffers"), list):
        raise ProtocolError("malformed message header (not an object with a buffer list)")
    if len(header["buffers"]) > MAX_BUFFERS:
        raise ProtocolError(f"message with {len(header['buffers'])} buffers")
    return header


def _buffer_spec(desc: Any) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, byte size) of one buffer description, every field checked."""
    if not isinstance(desc, dict) or set(desc) != {"dtype", "shape"}:
        raise ProtocolError("malformed buffer description")
    dtype, shape = desc["dtype"], desc["shape"]
    if dtype != "bytes" and dtype not in DTYPES:
        raise ProtocolError(f"buffer of dtype {str(dtype)[:40]!r} is not an allowed number type")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(s) is int and 0 <= s < (1 << 48) for s in shape)
        or (dtype == "bytes" and len(shape) != 1)
    ):
        raise ProtocolError("malformed buffer shape")
    itemsize = 1 if dtype == "bytes" else np.dtype(dtype).itemsize
    return dtype, tuple(shape), math.prod(shape) * itemsize


def expect(obj: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``obj`` if it is of ``kind`` (bool is not an int here), else a ProtocolError."""
    if isinstance(obj, bool) and kind in (int, (int,)):
        raise ProtocolError(f"malformed reply: {what}")
    if not isinstance(obj, kind):
        raise ProtocolError(f"malformed reply: {what}")
    return obj


# -- exports -------------------------------------------------------------------------------------

_EXPORT_FIELDS: dict[str, type] = {
    "input_name": str,
    "input_dtype": str,
    "layer": str,
    "framework": str,
    "logits_name": str,
    "features_name": str,
}
_OPTIONAL_INT = ("feature_dim", "num_classes")


def export_fields(export: Any) -> dict[str, Any]:
    """An OnnxExport's fields, the model bytes aside, as JSON values."""
    return {
        "input_name": export.input_name,
        "input_shape": list(export.input_shape),
        "input_dtype": export.input_dtype,
        "layer": export.layer,
        "feature_dim": export.feature_dim,
        "num_classes": export.num_classes,
        "notes": list(export.notes),
        "framework": export.framework,
        "logits_name": export.logits_name,
        "features_name": export.features_name,
        "cache_key": export.cache_key,
    }


def export_from_fields(fields: Any, model_bytes: bytes) -> Any:
    """The OnnxExport a worker's reply describes, each field checked for its type (the
    ``cache_key`` is checked against the model file by whoever stores it)."""
    from backdoorscan.adapters.base import OnnxExport

    expect(fields, dict, "export")
    out: dict[str, Any] = {
        key: expect(fields.get(key), kind, key) for key, kind in _EXPORT_FIELDS.items()
    }
    shape = expect(fields.get("input_shape"), list, "input_shape")
    for d in shape:
        if d is not None:
            expect(d, int, "input_shape")
    out["input_shape"] = tuple(shape)
    for key in _OPTIONAL_INT:
        v = fields.get(key)
        out[key] = None if v is None else expect(v, int, key)
    notes = expect(fields.get("notes"), list, "notes")
    out["notes"] = [expect(n, str, "notes") for n in notes]
    key = fields.get("cache_key")
    out["cache_key"] = None if key is None else expect(key, str, "cache_key")
    if set(fields) - set(out):
        raise ProtocolError("malformed reply: unexpected export fields")
    return OnnxExport(model_bytes=model_bytes, **out)
