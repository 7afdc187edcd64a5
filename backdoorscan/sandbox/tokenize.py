"""Tokenising texts with a model folder's tokenizer in a model worker.

A Hugging Face folder's ``tokenizer.json`` is part of an untrusted model: its regular
expressions and normalisers run on the texts. :func:`tokenize_in` asks a worker (Landlock,
seccomp, memory and time bounds, as for the model) to run ``adapters.hf.tokenize`` and checks
what comes back: token ids ``[N, L]`` and three plain fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from backdoorscan.sandbox import protocol

if TYPE_CHECKING:
    from backdoorscan.sandbox.client import ModelWorker

__all__ = ["tokenize_in"]


def tokenize_in(
    worker: ModelWorker,
    folder: str | Path,
    texts: list[str],
    max_length: int,
    pad_token_id: int | None = None,
) -> tuple[Any, int, list[int], int]:
    """``adapters.hf.tokenize(folder, texts, max_length, pad_token_id)`` in ``worker``: token
    ids ``[N, L]`` (int32), the pad id, the special tokens' ids, how many texts were cut."""
    path = str(Path(folder).expanduser().resolve())
    worker._ensure_setup("onnx")  # numpy and ONNX Runtime; tokenizers comes with the request
    request = {
        "op": "tokenize",
        "path": path,
        "texts": [str(t) for t in texts],
        "max_length": int(max_length),
        "pad": pad_token_id,
    }
    reply, bufs = worker._request(request, (), f"tokenising with {Path(path).name}")
    ids = bufs[0] if len(bufs) == 1 else None
    if not (getattr(ids, "ndim", 0) == 2 and len(ids) == len(texts) and ids.dtype.kind == "i"):
        raise worker._malformed("token ids of another shape than the texts'")
    special = protocol.expect(reply.get("special"), list, "special ids")
    return (
        ids,
        protocol.expect(reply.get("pad"), int, "pad id"),
        [protocol.expect(t, int, "special id") for t in special],
        protocol.expect(reply.get("truncated"), int, "truncated"),
    )
