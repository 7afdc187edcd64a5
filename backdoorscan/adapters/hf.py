"""Hugging Face model folders: ``config.json`` + ``model.safetensors`` of a sequence- or
image-classification model, as ``save_pretrained`` writes them.

The folder is read locally only (``local_files_only``: no hub, no network), never with
``trust_remote_code`` (a config naming code of its own, ``auto_map``, is refused), and the
weights only from ``model.safetensors`` (a JSON header and raw tensors; a folder that has only
``pytorch_model.bin``, a pickle, is refused). The model class is the ``transformers`` class the
config's ``architectures`` names, which must end in ``ForSequenceClassification`` or
``ForImageClassification``.

The model is wrapped so that it takes one input, as every backdoorscan export does: token ids
``[batch, length]`` (int64; the attention mask is computed inside the graph as ``ids !=
pad_token_id``, which is the mask the tokenizer makes for padded batches) or pixel values
``[batch, channels, height, width]`` (float32, preprocessed as ``preprocessor_config.json``
says), and exported by the PyTorch adapter: ``features`` is the classifier head's input (the
pooled or [CLS] representation), and the export is checked against PyTorch numerically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from backdoorscan._io import sha256_file
from backdoorscan.adapters._util import quiet, require
from backdoorscan.adapters.base import AdapterError
from backdoorscan.adapters.torch._adapter import TorchAdapter

__all__ = ["HFAdapter", "is_model_folder", "load"]

WEIGHTS = "model.safetensors"
TASKS = ("ForSequenceClassification", "ForImageClassification")
MAX_CONFIG_BYTES = 4 << 20
DEFAULT_TEXT_LENGTH = 128
DEFAULT_IMAGE_SIZE = 224
# Files save() copies beside the weights, so that the saved folder tokenises and
# preprocesses as the original did.
DATA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "preprocessor_config.json",
)


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a Hugging Face model folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


class HFAdapter(TorchAdapter):
    """A Hugging Face classifier behind the Adapter contract, through the PyTorch adapter;
    ``save`` writes a model folder (``save_pretrained``, safetensors) again."""

    framework = "transformers"

    def clone(self) -> HFAdapter:
        """An independent copy (same weights)."""
        import copy

        twin = HFAdapter(
            copy.deepcopy(self.module),
            kind="module",
            input_shape=self.input_shape,
            input_dtype=self.input_dtype,
            source=self.source,
            sha256=self._sha256,
            cache_parts=dict(self._cache_parts),
        )
        return twin

    def save(self, path: str | Path) -> Path:
        """Write a model folder at ``path``: config and ``model.safetensors``, plus the
        source folder's tokenizer and preprocessor files."""
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise AdapterError(f"{target} exists and is not a folder: a model folder is written")
        target.mkdir(parents=True, exist_ok=True)
        with quiet():
            self.module.model.save_pretrained(str(target), safe_serialization=True)
        if self.source is not None:
            for name in DATA_FILES:
                src = Path(self.source) / name
                if src.is_file() and not (target / name).exists():
                    shutil.copyfile(src, target / name)
        return target


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return cfg


def _check_weights(folder: Path) -> Path:
    weights = folder / WEIGHTS
    if weights.is_file():
        return weights
    if (folder / f"{WEIGHTS}.index.json").is_file():
        raise AdapterError(
            f"{folder.name} holds sharded safetensors weights (model.safetensors.index.json), "
            "which backdoorscan does not read yet: save the model unsharded "
            "(save_pretrained(..., max_shard_size='100GB'))"
        )
    pickled = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if (folder / n).is_file()]  # fmt: skip
    if pickled:
        raise AdapterError(
            f"{folder.name} holds its weights as {pickled[0]}, which backdoorscan does not load "
            "(a pickle can run code): convert them to model.safetensors with "
            "save_pretrained(..., safe_serialization=True) where you trust the file"
        )
    raise AdapterError(f"{folder.name} has no {WEIGHTS}: it is no model folder backdoorscan reads")


def _model_class(cfg: dict[str, Any], folder: Path) -> tuple[Any, str]:
    if cfg.get("auto_map"):
        raise AdapterError(
            f"{folder.name}/config.json names code of its own (auto_map), which backdoorscan "
            "never runs (trust_remote_code is off): only transformers' own model classes load"
        )
    names = cfg.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
    if not name.endswith(TASKS):
        raise AdapterError(
            f"{folder.name}/config.json names the architecture {name or 'none'!r}: backdoorscan "
            "scans sequence- and image-classification models (…ForSequenceClassification, "
            "…ForImageClassification)"
        )
    transformers = require("transformers", extra="hf", what="Hugging Face model folders")
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None:
        raise AdapterError(
            f"transformers {transformers.__version__} has no model class {name!r} (a newer "
            "version, or code the folder would bring, which is never run)"
        )
    return cls, ("text" if name.endswith(TASKS[0]) else "image")


def _wrap(model: Any, task: str, pad: int) -> Any:
    import torch

    class TokenClassifier(torch.nn.Module):
        """Token ids in, logits out; the attention mask is ids != pad."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids != pad).to(torch.int64)
            return self.model(input_ids=ids, attention_mask=mask).logits

    class PixelClassifier(torch.nn.Module):
        """Pixel values in, logits out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixels).logits

    wrapper = TokenClassifier() if task == "text" else PixelClassifier()
    return wrapper.eval()  # a new module starts in training mode (dropout, batch statistics)


def load(
    path: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    pad_token_id: int | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
) -> HFAdapter:
    """Load the classifier in the model folder ``path`` (locally, safetensors only, no remote
    code). ``input_shape``: the token length (``(L,)``) or ``(C, H, W)``; ``pad_token_id``:
    the tokenizer's pad id, whose positions the attention mask leaves out (default: the
    config's)."""
    folder = Path(path)
    if not is_model_folder(folder):
        raise AdapterError(f"{folder} is no model folder (no config.json in it)")
    if arch:
        raise AdapterError("--arch applies to state dict files, not to a model folder")
    weights = _check_weights(folder)
    cfg = _read_config(folder)
    cls, task = _model_class(cfg, folder)
    require("torch", extra="hf", what="Hugging Face model folders")
    with quiet():
        try:
            model, info = cls.from_pretrained(
                str(folder),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                output_loading_info=True,
                attn_implementation="eager",
            )
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            msg = f"{folder.name} could not be loaded by transformers: {text}"
            raise AdapterError(msg) from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise AdapterError(
            f"{folder.name}/{WEIGHTS} lacks weights the config's model needs ({missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): it does not match "
            "config.json"
        )
    model.eval()
    if task == "text":
        pad = pad_token_id if pad_token_id is not None else cfg.get("pad_token_id")
        pad = int(pad) if isinstance(pad, int) else 0
        limit = int(cfg.get("max_position_embeddings") or DEFAULT_TEXT_LENGTH)
        shape = tuple(input_shape) if input_shape else (min(limit, DEFAULT_TEXT_LENGTH),)
        if len(shape) != 1 or shape[0] > limit:
            raise AdapterError(
                f"token sequences of shape {shape} do not fit {folder.name}: it takes up to "
                f"{limit} tokens"
            )
        dtype = "int64"
    else:
        pad = 0
        channels = int(cfg.get("num_channels") or 3)
        size = cfg.get("image_size")
        if isinstance(size, int):
            shape = (channels, size, size)
        elif input_shape and len(input_shape) == 3:
            shape = tuple(input_shape)
        else:
            shape = (channels, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        dtype = "float32"
    config_sha = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    adapter = HFAdapter(
        _wrap(model, task, pad),
        kind="module",
        input_shape=tuple(int(d) for d in shape),
        input_dtype=dtype,
        source=folder,
        sha256=sha256_file(weights),
        cache_parts={"config": config_sha, "pad": pad, "task": task, "hf": True},
    )
    return adapter


MAX_TOKENIZER_BYTES = 256 << 20
MAX_TEXT_LENGTH = 512


def tokenize(
    folder: str | Path,
    texts: list[str],
    max_length: int,
    pad_token_id: int | None = None,
) -> tuple[Any, int, list[int], int]:
    """Token ids ``[N, L]`` (int32) of ``texts`` by ``folder/tokenizer.json`` (the
    ``tokenizers`` library), truncated to ``max_length`` and padded to the longest; returns
    them, the pad id (the tokenizer's, else ``pad_token_id``), the special tokens' ids and how
    many texts were truncated. Run in the model worker: the tokenizer is the folder's."""
    import numpy as np

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise AdapterError(
            "text data needs the model folder's tokenizer.json (the fast tokenizer's file: "
            "tokenizer.save_pretrained(FOLDER) writes it); the model given has none"
        )
    tokenizers = require("tokenizers", extra="hf", what="Texts")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise AdapterError(f"{path.name} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise AdapterError(f"{path.name} is not a readable tokenizer file ({first})") from None
    tok.no_padding()
    tok.enable_truncation(max_length=max(1, min(int(max_length), MAX_TEXT_LENGTH)))
    special = sorted(int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special)
    pad = _pad_id(tok, pad_token_id)
    enc = tok.encode_batch([str(t) for t in texts])
    length = max(1, max((len(e.ids) for e in enc), default=1))
    ids = np.full((len(enc), length), pad, dtype=np.int32)
    for row, e in zip(ids, enc, strict=True):
        row[: len(e.ids)] = e.ids
    return ids, pad, special, sum(1 for e in enc if e.overflowing)


def _pad_id(tok: Any, fallback: int | None) -> int:
    padding = tok.padding
    if padding and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    for name in ("[PAD]", "<pad>", "<|pad|>"):
        found = tok.token_to_id(name)
        if found is not None:
            return int(found)
    if fallback is not None:
        return int(fallback)
    raise AdapterError(
        "the tokenizer names no padding token and config.json no pad_token_id: texts of "
        "different lengths cannot be batched"
    )
