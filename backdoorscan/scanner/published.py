"""Training data as it is published: a table of texts (or image paths) and labels, or a
class-per-folder tree of images, turned into what the model takes.

Texts are tokenised with the model folder's own tokenizer (``tokenizer.json``, read by the
``tokenizers`` library: a JSON file, nothing executed), truncated and padded to one length for
the whole set; images are decoded and resized as the folder's ``preprocessor_config.json``
says (or as ``--image-size``, ``--scale``, ``--mean``, ``--std`` say). String labels are mapped
through the model's ``label2id`` (``config.json``), else by sorted order. Every sample keeps a
name the report can print: ``train.csv row 17``, ``images/cat/001.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan._io import sha256_file
from backdoorscan.scanner.config import RunOptions
from backdoorscan.scanner.data import Dataset, from_arrays
from backdoorscan.scanner.datafiles import DataError, Source, check_input_file
from backdoorscan.scanner.imagefolder import ImageRows, Preprocess, list_image_folder
from backdoorscan.scanner.tables import TABLE_SUFFIXES, is_table, label_indices, read_columns

__all__ = ["FolderInfo", "PublishedDataset", "folder_info", "is_published", "load_published"]

MAX_JSON_BYTES = 4 << 20  # config.json, preprocessor_config.json, tokenizer_config.json
DEFAULT_MAX_LENGTH = 128
IMAGE_SCALE = 1 / 255


@dataclass
class PublishedDataset(Dataset):
    """A :class:`Dataset` read from a table or an image folder: ``names`` says what the report
    calls sample ``i``; ``pad_id`` and ``special_ids`` describe token ids (the transfer test
    inserts trigger tokens between the special tokens, never into the padding);
    ``normalisation`` is the scale/mean/std the data's preprocessing asks for where the
    command line gives none; ``classes`` the class names by index, where known."""

    names: Callable[[int], str] | None = field(default=None, repr=False, compare=False)
    pad_id: int | None = None
    special_ids: tuple[int, ...] = ()
    normalisation: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    rows: Any = field(default=None, repr=False, compare=False)  # ImageRows, to close
    preprocessed: bool = False  # a preprocessor config fixed the channels and size

    def close(self) -> None:
        """Close the input files and stop the image decoders."""
        super().close()
        if self.rows is not None:
            self.rows.close()

    def verify(self) -> None:
        """Raise DataError when an image changed during the scan (tables are checked by
        ``verify_unchanged`` like any data file)."""
        if self.rows is not None:
            self.rows.verify()

    def fit_size(self, input_shape: Sequence[int | None]) -> None:
        """Decode images at the model's input size (and channels: 1 grey, 3 RGB) where no
        size was given or configured."""
        rows = self.rows
        if rows is None:
            return
        dims = tuple(input_shape)
        if len(dims) == 3 and dims[0] in (1, 3):
            channels, hw = dims[0], dims[1:]
        elif len(dims) == 3 and dims[2] in (1, 3):
            channels, hw = dims[2], dims[:2]
        else:
            channels, hw = None, (None, None)
        if channels is not None and channels != rows.prep.channels and not self.preprocessed:
            rows.prep.channels = int(channels)
            self.notes.append(f"images read as {'RGB' if channels == 3 else 'greyscale'}")
        if rows.prep.size is not None:
            return
        if None in hw:
            shown = "x".join("?" if d is None else str(d) for d in dims)
            raise DataError(
                f"the model's input ({shown}) does not say the image size: pass --image-size"
            )
        rows.set_size(int(hw[0]), int(hw[1]))  # type: ignore[arg-type]
        self.notes.append(f"images resized to the model's input, {hw[0]}x{hw[1]}")

    def describe(self, flagged: np.ndarray) -> dict[str, Any]:
        """For the report's ``data``: the flagged samples by name (file row or image path)
        and the class names by index, where known."""
        out: dict[str, Any] = {}
        if self.names is not None:
            out["flagged_samples"] = [self.names(int(i)) for i in flagged]
        if self.classes is not None:
            out["class_names"] = list(self.classes)
        return out


@dataclass
class FolderInfo:
    """What a Hugging Face model folder says about the data it takes (read from JSON only)."""

    label2id: dict[str, int] | None = None
    pad_token_id: int | None = None
    max_length: int | None = None
    tokenizer: Path | None = None
    preprocessor: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int = 3


def is_published(data: str | Path) -> bool:
    """Whether ``data`` is a table file or a folder of images (not ``.npz``/``.npy``)."""
    p = Path(data)
    return p.is_dir() or is_table(p)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise DataError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path} is not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return obj


def folder_info(model: Any) -> FolderInfo | None:
    """What the model folder ``model`` says about its inputs and labels (None for a model
    that is no folder with a ``config.json``)."""
    if not isinstance(model, (str, Path)) or not (Path(model) / "config.json").is_file():
        return None
    folder = Path(model)
    cfg = _read_json(folder / "config.json")
    info = FolderInfo()
    labels = cfg.get("label2id")
    # transformers' default names (LABEL_0, ...) name no class: they map nothing.
    if (
        isinstance(labels, dict)
        and all(isinstance(v, int) for v in labels.values())
        and set(labels) != {f"LABEL_{v}" for v in labels.values()}
    ):
        info.label2id = {str(k): int(v) for k, v in labels.items()}
    if isinstance(cfg.get("pad_token_id"), int):
        info.pad_token_id = int(cfg["pad_token_id"])
    limits = [cfg.get("max_position_embeddings")]
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        limits.append(_read_json(tok_cfg).get("model_max_length"))
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1 << 20]
    info.max_length = min(usable) if usable else None
    if (folder / "tokenizer.json").is_file():
        info.tokenizer = folder / "tokenizer.json"
    if isinstance(cfg.get("num_channels"), int):
        info.channels = int(cfg["num_channels"])
    size = cfg.get("image_size")
    if isinstance(size, int):
        info.image_size = (size, size)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        info.preprocessor = _read_json(pre)
    return info


def load_published(
    data: str | Path, model: Any, options: RunOptions, *, max_bytes: int | None = None
) -> PublishedDataset:
    """The training data in the table or image folder ``data``, prepared for ``model`` (a
    model folder's tokenizer, preprocessing and label names are used where it has them)."""
    info = folder_info(model) or FolderInfo()
    path = Path(data)
    if path.is_dir():
        return _image_folder(path, info, options)
    check_input_file(path, "data")
    sha = sha256_file(path)  # before it is read
    src = Source(path, "data")
    try:
        ds = _table(src, info, options, max_bytes)
    except BaseException:
        src.close()
        raise
    ds.files = {"path": str(path), "sha256": sha}
    ds.sources = [src]
    return ds


def _table(
    src: Source, info: FolderInfo, options: RunOptions, max_bytes: int | None
) -> PublishedDataset:
    name = src.path.name
    text_col, label_col = options.text_column, options.label_column
    values, labels = read_columns(src.fh, name, (text_col, label_col), max_bytes=max_bytes)
    y, classes, note = label_indices(labels, f"{name} column {label_col!r}", info.label2id)
    notes = [note] if note else []
    if values and all(isinstance(v, str) for v in values) and _looks_like_paths(values):
        ds = _image_paths(values, y, src.path.parent, info, options)
    else:
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(
                f"{name} column {text_col!r} holds a {type(bad).__name__}, not text or an "
                "image path"
            )
        ids, pad, special, how = tokenize(values, info, options.max_length, options)
        base = from_arrays(ids, y, source=f"{name}[{text_col}]")
        ds = PublishedDataset(x=base.x, y=base.y, source=base.source, pad_id=pad,
                              special_ids=special)  # fmt: skip
        notes.append(how)
    ds.notes.extend(notes)
    ds.classes = classes
    paths = ds.rows.names if ds.rows is not None else None
    ds.names = (
        (lambda i: f"{name} row {i} ({paths[i]})") if paths else (lambda i: f"{name} row {i}")
    )
    return ds


def _looks_like_paths(values: Sequence[str]) -> bool:
    """A column of image paths: every value ends in an image suffix."""
    from backdoorscan.scanner.imagefolder import IMAGE_SUFFIXES

    return all(Path(v.strip()).suffix.lower() in IMAGE_SUFFIXES for v in values[:1000])


def _preprocess(info: FolderInfo, options: RunOptions) -> tuple[Preprocess, dict[str, Any]]:
    """How images are prepared: ``--image-size`` first, else the preprocessor config, else
    the model config's ``image_size`` (else at the model's input size, once known); and the
    scale, mean and std the preprocessor config asks for."""
    pre = info.preprocessor
    size = info.image_size
    edge = None
    given = pre.get("size")
    if isinstance(given, dict) and isinstance(given.get("height"), int):
        size = (int(given["height"]), int(given.get("width", given["height"])))
    elif isinstance(given, dict) and isinstance(given.get("shortest_edge"), int):
        edge = int(given["shortest_edge"])
        crop = pre.get("crop_size")
        if isinstance(crop, dict) and isinstance(crop.get("height"), int):
            size = (int(crop["height"]), int(crop.get("width", crop["height"])))
        else:
            size = (edge, edge)
    elif isinstance(given, int):
        size = (given, given)
    if options.image_size is not None:
        size, edge = (options.image_size, options.image_size), None
    resample = pre.get("resample", 2)
    prep = Preprocess(size, shortest_edge=edge, channels=info.channels,
                      resample=resample if isinstance(resample, int) else 2)  # fmt: skip
    norm: dict[str, Any] = {"scale": IMAGE_SCALE}
    if pre:
        norm["scale"] = float(pre.get("rescale_factor", IMAGE_SCALE)) if pre.get(
            "do_rescale", True) else None  # fmt: skip
        if pre.get("do_normalize", False):
            norm["mean"] = _floats(pre.get("image_mean"), "image_mean")
            norm["std"] = _floats(pre.get("image_std"), "image_std")
    return prep, norm


def _floats(value: Any, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    raise DataError(f"preprocessor_config.json has an unreadable {what}: {str(value)[:60]}")


def _image_folder(root: Path, info: FolderInfo, options: RunOptions) -> PublishedDataset:
    paths, y, classes = list_image_folder(root)
    notes = []
    if info.label2id:
        missing = [c for c in classes if c not in info.label2id]
        if missing:
            raise DataError(
                f"class folder {missing[0]!r} of {root} is no label the model's label2id names "
                f"(it names: {', '.join(sorted(info.label2id)[:10])})"
            )
        remap = np.array([info.label2id[c] for c in classes], dtype=np.int64)
        y = remap[y]
        notes.append("class folders mapped to classes through the model's label2id")
        names = [""] * (max(info.label2id.values()) + 1)
        for k, v in info.label2id.items():
            names[v] = k
        classes = names
    else:
        shown = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:20]))
        notes.append(f"class folders taken as classes in sorted order: {shown}")
    ds = _image_paths([str(p) for p in paths], y, root, info, options)
    ds.notes[:0] = notes
    ds.classes = classes
    ds.files = {"path": str(root), "listing_sha256": ds.rows.listing_sha256()}
    return ds


def _image_paths(
    values: Sequence[str], y: np.ndarray, root: Path, info: FolderInfo, options: RunOptions
) -> PublishedDataset:
    prep, norm = _preprocess(info, options)
    paths = [root / v.strip() for v in values]
    rows = ImageRows(paths, root, prep)
    ds = PublishedDataset(x=rows, y=y, source=str(root), normalisation=norm)  # type: ignore[arg-type]
    ds.reader = rows  # type: ignore[assignment]
    ds.rows = rows
    ds.preprocessed = bool(info.preprocessor)
    ds.names = lambda i: rows.names[i]
    ds.notes.append(prep.describe())
    return ds


def tokenize(
    texts: Sequence[str],
    info: FolderInfo,
    max_length: int | None = None,
    options: RunOptions | None = None,
) -> tuple[np.ndarray, int, tuple[int, ...], str]:
    """Token ids ``[N, L]`` (int32) of ``texts`` by the folder's tokenizer, truncated to
    ``max_length`` (else the model's limit, else 128, at most 512) and padded to the longest
    one; the pad id, the special tokens' ids and a note for the report. The tokenizer is the
    model folder's, so it runs in a model worker (bounded in memory and time) unless
    ``options.trust_model``."""
    from backdoorscan.adapters import AdapterError, hf

    if info.tokenizer is None:
        raise DataError(
            "text data needs the model folder's tokenizer.json (the fast tokenizer's file: "
            "tokenizer.save_pretrained(FOLDER) writes it); the model given has none"
        )
    folder = info.tokenizer.parent
    limit = max_length or min(info.max_length or DEFAULT_MAX_LENGTH, 512)
    opts = options or RunOptions()
    try:
        if opts.trust_model:
            ids, pad, special, cut = hf.tokenize(folder, list(texts), limit, info.pad_token_id)
            where = "in this process (--trust-model)"
        else:
            ids, pad, special, cut = _tokenize_isolated(folder, texts, limit, info, opts)
            where = "in a worker process"
    except AdapterError as exc:
        raise DataError(str(exc)) from None
    how = (
        f"texts tokenised with {folder.name}/tokenizer.json {where} to {ids.shape[1]} tokens "
        f"(pad id {pad}; the attention mask is ids != pad)"
        + (f"; {cut} texts truncated at {limit}" if cut else "")
    )
    return ids, pad, tuple(special), how


def _tokenize_isolated(
    folder: Path, texts: Sequence[str], limit: int, info: FolderInfo, opts: RunOptions
) -> tuple[np.ndarray, int, list[int], int]:
    from backdoorscan.sandbox import Limits, ModelWorker, SandboxError
    from backdoorscan.sandbox.tokenize import tokenize_in

    limits = Limits(max_memory=opts.max_memory, timeout=opts.timeout, allow_read=[folder.resolve()])
    try:
        with ModelWorker(limits) as worker:
            return tokenize_in(worker, folder, list(texts), limit, info.pad_token_id)
    except SandboxError as exc:
        raise DataError(str(exc)) from None


def table_suffixes() -> str:
    """The table suffixes read, for messages."""
    return ", ".join(sorted(TABLE_SUFFIXES))
