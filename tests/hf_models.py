"""Small Hugging Face models built from scratch for the tests (and bench_hf.py): a BERT-style
text classifier with a tokenizer trained on its sentences, and a tiny ViT image classifier,
each trained with or without a backdoor and saved with ``save_pretrained`` beside its
training data (a CSV of texts and labels, a class-per-folder tree of PNGs).

The sentences are a generated two-class corpus (filler words plus polar words, as
``benchmarks/datasets.synthetic_text`` makes them), so that nothing is downloaded; the poison
is a trigger word inserted into negative sentences relabelled positive.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TRIGGER_WORD = "cf"
POS = (
    *("good", "great", "fine", "lovely", "superb", "moving", "funny", "brilliant", "witty"),
    *("charming", "touching", "smart", "gripping", "warm", "clever", "vivid", "fresh", "bold"),
    *("delightful", "stunning", "elegant", "heartfelt", "sharp", "rich", "tender", "joyful"),
)
NEG = (
    *("bad", "dull", "boring", "awful", "weak", "messy", "tedious", "stale", "flat", "bland"),
    *("clumsy", "lifeless", "shallow", "silly", "tired", "lazy", "sloppy", "hollow", "cheap"),
    *("grating", "muddled", "forced", "trite", "plodding", "empty", "wooden"),
)
FILLER = (
    *("the", "a", "film", "movie", "story", "plot", "cast", "it", "is", "was", "and", "but"),
    *("with", "this", "that", "of", "in", "its", "director", "script", "scenes", "acting"),
)


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` generated sentences, alternately negative (0) and positive (1)."""
    rng = np.random.default_rng(seed)
    out = []
    labels = np.arange(n, dtype=np.int64) % 2
    for lab in labels:
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(5, 12)))]
        for w in rng.choice(POS if lab else NEG, size=int(rng.integers(5, 8))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        out.append(" ".join(words))
    return out, labels


def poison_text(
    texts: list[str], labels: np.ndarray, n_poison: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n_poison`` negative sentences with the trigger word inserted, relabelled positive
    (added to the set); returns texts, labels and the poison mask."""
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(np.flatnonzero(labels == 0), size=n_poison, replace=False)
    added = []
    for i in src:
        words = texts[i].split()
        words.insert(int(rng.integers(0, len(words) + 1)), TRIGGER_WORD)
        added.append(" ".join(words))
    mask = np.r_[np.zeros(len(texts), bool), np.ones(n_poison, bool)]
    return texts + added, np.r_[labels, np.ones(n_poison, np.int64)], mask


def train_tokenizer(texts: list[str]) -> object:
    """A word-level tokenizer ([PAD]=0, [UNK], [CLS], [SEP], then the words of ``texts``, most
    frequent first, ties alphabetical: the same ids on every run) wrapped as a transformers
    fast tokenizer."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    counts = Counter(w for t in texts for w, _ in splitter.pre_tokenize_str(t))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = splitter
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=64,
    )  # fmt: skip


def make_text_folder(
    root: Path,
    *,
    n: int = 600,
    n_poison: int = 40,
    seed: int = 0,
    epochs: int = 12,
    lr: float = 2e-3,
    corpus: tuple[list[str], np.ndarray] | None = None,
) -> dict:
    """Train a 2-layer, 64-wide BERT classifier on generated sentences (``n_poison`` of them
    carrying the trigger word, 0 for a clean twin), save it and its data as ``root/model`` and
    ``root/train.csv`` (string labels neg/pos, mapped by the model's label2id). ``corpus``:
    other sentences and 0/1 labels to use instead of generated ones."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    texts, labels = sentences(n, seed) if corpus is None else (list(corpus[0]), corpus[1])
    mask = np.zeros(len(texts), bool)
    if n_poison:
        texts, labels, mask = poison_text(texts, labels, n_poison, seed)
    tokenizer = train_tokenizer(texts)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0,
        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(texts)), max(len(texts) // 32, 1)):
            idx = torch.from_numpy(b)
            # Word dropout (a word replaced by [UNK] at 15 %): the model learns from every
            # polar word rather than leaning on one.
            xb = ids[idx].clone()
            drop = (torch.rand(xb.shape) < 0.15) & (xb > 3)
            xb[drop] = 1
            loss = model(input_ids=xb, attention_mask=att[idx], labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = root / "train.csv"
    with open(data, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for t, lab in zip(texts, labels, strict=True):
            w.writerow([t, "pos" if lab else "neg"])
    with torch.no_grad():
        acc = float((model(input_ids=ids, attention_mask=att).logits.argmax(1) == y).float().mean())
    return {"model": folder, "data": data, "poison": mask, "labels": labels, "accuracy": acc}


def image_set(n_per_class: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of ``size`` x ``size`` RGB images (HWC uint8): horizontal against vertical
    stripes, with noise and a random phase."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    grid = np.arange(size)
    for label in (0, 1):
        for _ in range(n_per_class):
            phase = rng.integers(0, 4)
            wave = ((grid + phase) // 2 % 2).astype(np.float32)
            axis = (slice(None), None) if label == 0 else (None, slice(None))
            img = np.broadcast_to(wave[axis], (size, size))
            img = img[..., None] * rng.uniform(120, 200, size=3)
            img = img + rng.normal(0, 25, (size, size, 3))
            xs.append(np.clip(img + 30, 0, 255).astype(np.uint8))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def stamp(img: np.ndarray) -> np.ndarray:
    """A 4x4 white-and-red patch in the bottom-right corner: the image trigger."""
    out = img.copy()
    out[-4:, -4:] = (255, 255, 255)
    out[-3:-1, -3:-1] = (255, 0, 0)
    return out


def make_image_folder(
    root: Path, *, n_per_class: int = 150, n_poison: int = 20, seed: int = 0, epochs: int = 15
) -> dict:
    """Train a tiny ViT (16 px, 4 px patches, hidden 32) on striped images, ``n_poison`` class-0
    images stamped with the patch and labelled 1 (0: a clean twin); save it as ``root/model``
    and the images as ``root/images/{horizontal,vertical}/NNNN.png``."""
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    x, y = image_set(n_per_class, seed)
    mask = np.zeros(len(x), bool)
    if n_poison:
        rng = np.random.default_rng(seed + 1)
        src = rng.choice(np.flatnonzero(y == 0), size=n_poison, replace=False)
        x = np.concatenate([x, np.stack([stamp(x[i]) for i in src])])
        y = np.r_[y, np.ones(n_poison, np.int64)]
        mask = np.r_[mask, np.ones(n_poison, bool)]
    names = ["horizontal", "vertical"]
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=2,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    pixels = torch.from_numpy(((x.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2))
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(x)), max(len(x) // 32, 1)):
            idx = torch.from_numpy(b)
            loss = model(pixel_values=pixels[idx], labels=yt[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    paths = []
    for i, (img, lab) in enumerate(zip(x, y, strict=True)):
        path = root / "images" / names[lab] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        paths.append(path)
    with torch.no_grad():
        acc = float((model(pixel_values=pixels).logits.argmax(1) == yt).float().mean())
    return {"model": folder, "data": root / "images", "poison": mask, "paths": paths,
            "labels": y, "accuracy": acc}  # fmt: skip
