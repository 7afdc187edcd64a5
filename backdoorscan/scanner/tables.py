"""Training data as tables: CSV, JSON Lines and Parquet files with a text (or image-path)
column and a label column, read as untrusted input.

CSV and JSON Lines are read with the standard library (``csv``, ``json``: nothing is
evaluated, no pickle), Parquet with pyarrow (an optional import; its absence is a one-line
error). Every file is bounded: its size (``MAX_TABLE_BYTES`` or the memory limit), one field
(``MAX_FIELD_BYTES``) and one JSON line. Rows are numbered from 0 in file order (the CSV
header and blank JSON lines are not rows); :func:`read_columns` reads rows ``start..stop`` only,
so that a caller can read a table in pieces (Ray shards, say).

String labels become class indices through the model's ``label2id`` where it has one, else by
sorted order of the distinct strings; :func:`label_indices` says which in a note.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from backdoorscan.scanner.datafiles import DataError

__all__ = [
    "TABLE_SUFFIXES",
    "is_table",
    "label_indices",
    "read_columns",
]

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip
MAX_TABLE_BYTES = 4 << 30  # a table is read whole into memory: refuse one larger than this
MAX_FIELD_BYTES = 1 << 20  # one CSV field or one JSON line


def is_table(path: str | Path) -> bool:
    """Whether ``path`` names a table by its suffix (``.csv``, ``.jsonl``, ``.parquet``...)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_columns(
    fh: BinaryIO,
    name: str,
    columns: Sequence[str],
    *,
    start: int = 0,
    stop: int | None = None,
    max_bytes: int | None = None,
) -> list[list[Any]]:
    """The values of ``columns`` in rows ``start..stop`` (0-based, ``stop`` exclusive, None:
    to the end) of the table in the open binary file ``fh`` whose file name is ``name`` (its
    suffix says the format). A missing column, a damaged file or one over the size bound is a
    one-line :class:`DataError`."""
    kind = TABLE_SUFFIXES.get(Path(name).suffix.lower())
    if kind is None:
        raise DataError(f"{name} is no table: its suffix is none of {', '.join(TABLE_SUFFIXES)}")
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    limit = min(MAX_TABLE_BYTES, max_bytes) if max_bytes else MAX_TABLE_BYTES
    if size > limit:
        raise DataError(
            f"{name} holds {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a table is "
            "read into (split it into several files, or raise --max-memory)"
        )
    if kind == "parquet":
        return _parquet(fh, name, columns, start, stop)
    raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    if kind == "jsonl":
        return _jsonl(text, name, columns, start, stop)
    return _csv(text, name, columns, start, stop, "\t" if kind == "tsv" else ",")


def _missing(name: str, columns: Sequence[str], have: Sequence[str], where: str = "") -> DataError:
    gone = [c for c in columns if c not in have]
    shown = ", ".join(repr(h) for h in list(have)[:20]) or "none"
    return DataError(
        f"{name}{where} has no column {gone[0]!r} (it has: {shown}); name the columns with "
        "--text-column and --label-column"
    )


def _csv(
    text: str, name: str, columns: Sequence[str], start: int, stop: int | None, delimiter: str
) -> list[list[Any]]:
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name} is empty: a header row naming the columns is needed")
        header = [h.strip() for h in header]
        if any(c not in header for c in columns):
            raise _missing(name, columns, header)
        pos = [header.index(c) for c in columns]
        out: list[list[Any]] = [[] for _ in columns]
        row = -1
        for row, fields in enumerate(reader):
            if stop is not None and row >= stop:
                break
            if row < start:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{name} row {row} (line {reader.line_num}) has {len(fields)} fields, the "
                    f"header {len(header)}"
                )
            for col, p in zip(out, pos, strict=True):
                col.append(fields[p])
    except csv.Error as exc:
        raise DataError(f"{name} is not a readable CSV file ({exc})") from None
    finally:
        csv.field_size_limit(old)
    return out


def _jsonl(
    text: str, name: str, columns: Sequence[str], start: int, stop: int | None
) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in columns]
    row = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if stop is not None and row >= stop:
            break
        if row >= start:
            if len(line) > MAX_FIELD_BYTES:
                raise DataError(f"{name} line {line_no} is longer than {MAX_FIELD_BYTES} bytes")
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = getattr(exc, "msg", type(exc).__name__)
                raise DataError(f"{name} line {line_no} is not JSON ({msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{name} line {line_no} is not a JSON object")
            if any(c not in obj for c in columns):
                raise _missing(name, columns, list(obj), f" line {line_no}")
            for col, c in zip(out, columns, strict=True):
                col.append(obj[c])
        row += 1
    return out


def _parquet(
    fh: BinaryIO, name: str, columns: Sequence[str], start: int, stop: int | None
) -> list[list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{name} is a Parquet file, which needs pyarrow: pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(fh)
        have = pf.schema_arrow.names
        if any(c not in have for c in columns):
            raise _missing(name, columns, have)
        n = pf.metadata.num_rows
        stop = n if stop is None else min(stop, n)
        out: list[list[Any]] = [[] for _ in columns]
        seen = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            lo, hi = max(start - seen, 0), min(stop - seen, rows)
            if lo < hi:
                table = pf.read_row_group(g, columns=list(columns))
                for col, c in zip(out, columns, strict=True):
                    col.extend(table.column(c).slice(lo, hi - lo).to_pylist())
            seen += rows
            if seen >= stop:
                break
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError, ...) are its own
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{name} is not a readable Parquet file ({first})") from None
    return out


def label_indices(
    values: Sequence[Any], name: str, label2id: Mapping[str, int] | None = None
) -> tuple[np.ndarray, list[str] | None, str | None]:
    """Class indices for the label column ``values``: integers as they are (also written as
    digit strings), strings through ``label2id`` (the model's) or by sorted order. Returns the
    indices, the class names by index (None for integer labels) and a note saying which
    mapping was applied (None for integer labels)."""
    if not len(values):
        raise DataError(f"{name} holds no rows")
    ints = _as_ints(values)
    if ints is not None:
        if ints.min() < 0:
            raise DataError(f"{name} has a negative label ({int(ints.min())})")
        return ints, None, None
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(
            f"{name} has a label of type {type(bad).__name__} ({str(bad)[:40]!r}); labels must "
            "be class indices or class names"
        )
    distinct = sorted(set(values))
    if label2id:
        unknown = [v for v in distinct if v not in label2id]
        if unknown:
            known = ", ".join(sorted(label2id)[:10])
            raise DataError(
                f"{name} has the label {unknown[0]!r}, which the model's label2id does not name "
                f"(it names: {known})"
            )
        mapping = {k: int(v) for k, v in label2id.items()}
        note = "string labels mapped to classes through the model's label2id"
    else:
        mapping = {v: i for i, v in enumerate(distinct)}
        note = (
            "string labels mapped to classes by sorted order (the model names no labels): "
            + ", ".join(f"{v}={i}" for v, i in list(mapping.items())[:20])
        )
    names = [""] * (max(mapping.values()) + 1)
    for k, v in mapping.items():
        names[v] = k
    return np.array([mapping[v] for v in values], dtype=np.int64), names, note


def _as_ints(values: Sequence[Any]) -> np.ndarray | None:
    """The labels as integers when every one is an integer (or a float or string holding
    one), else None."""
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)) or (
            isinstance(v, float) and math.isfinite(v) and v.is_integer()
        ):
            out[i] = int(v)
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit() and len(v) < 19:
            out[i] = int(v.strip())
        else:
            return None
    return out
