"""Small architectures the adapter tests load by ``module:callable`` (tests/ is put on sys.path).

PyTorch models take [N, 1, 12, 12] images (or 64 features) and give 10 logits; the Keras
builders take NHWC [N, 8, 8, 1] images or 64 features and import keras when called. The
classes live at module level so that torch.save(model) can pickle them (for the refusal tests)
and TorchScript can compile them (their forward arguments are untyped, which it reads as Tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Cnn(nn.Module):
    """conv-relu-pool, fc1 (16 units, the penultimate layer), fc2: the classic digits CNN."""

    def __init__(self, channels: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(channels * 5 * 5, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(self.conv(x).relu()).flatten(1)
        return self.fc2(self.fc1(x).relu())


def cnn(channels: int = 4, classes: int = 10) -> Cnn:
    """The CNN, as an ``--arch`` callable with keyword arguments."""
    return Cnn(channels, classes)


def mlp(in_features: int = 64, hidden: int = 32, classes: int = 10) -> nn.Sequential:
    """Two hidden layers on flat features; the head is module "4", its input the features."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


class Block(nn.Module):
    """A residual block: conv-bn-relu-conv-bn, plus the identity, then relu."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (x + self.bn2(self.conv2(out))).relu()


class ResNet(nn.Module):
    """A stem, two residual blocks (layer1.0, layer1.1), global average pooling and a head."""

    def __init__(self, width: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.layer1 = nn.Sequential(Block(width), Block(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.layer1(self.stem(x).relu())
        return self.fc(self.pool(x).flatten(1))


def resnet(width: int = 6, classes: int = 10, seed: int = 0) -> ResNet:
    """The ResNet with non-trivial BatchNorm running statistics, so eval mode really matters."""
    model = ResNet(width, classes)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


class TwoInputs(nn.Module):
    """A model whose forward needs two tensors: not scannable as is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x, mask):
        return self.fc(x * mask)


def no_head() -> nn.Sequential:
    """Convolutions and pooling straight to 10 outputs: a classifier without any nn.Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class TupleOut(nn.Module):
    """Returns (logits, embedding): not a plain classifier output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc1(x).relu()
        return self.fc2(h), h


class FixedBatch(nn.Module):
    """Reshapes with a hard-coded batch of 8: its export cannot take other batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.reshape(8, 64))


class TextNet(nn.Module):
    """Token ids [N, 12] (int64, vocabulary 50): embedding, mean over tokens, fc1, 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc1 = nn.Linear(8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.fc1(self.emb(x).mean(1)).relu())


def keras_sequential(seed: int = 0) -> Any:
    """Conv-Flatten-Dense(16)-Dense(10) on NHWC 8x8x1 images."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ]
    )


def keras_functional(seed: int = 0, softmax: bool = False) -> Any:
    """Two branches on 64 features, concatenated, then a Dense head (softmax on request)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,), name="pixels")
    a = keras.layers.Dense(16, activation="relu", name="branch_a")(inp)
    b = keras.layers.Dense(8, activation="tanh", name="branch_b")(inp)
    h = keras.layers.Concatenate(name="merge")([a, b])
    h = keras.layers.Dense(24, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(10, activation="softmax" if softmax else None, name="head")(h)
    return keras.Model(inp, out)
