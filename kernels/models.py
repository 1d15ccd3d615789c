"""Model architectures, the model output function (margin) and image preprocessing.

Models here have no batch-norm or other running state, so many of them can be stacked and
trained as one batched computation with torch.func (see kernels/train.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

ARCHS = ("logreg", "mlp", "small_cnn")


class LogReg(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), num_classes)

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


class MLP(nn.Module):
    def __init__(self, in_shape, num_classes, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def embed(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return torch.relu(self.fc2(h))

    def forward(self, x):
        return self.out(self.embed(x))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks with max-pooling, then a linear head; for 28x28 and 32x32 images."""

    def __init__(self, in_shape, num_classes, hidden=32):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2 * hidden, 3, padding=1)
        self.out = nn.Linear(2 * hidden * (h // 4) * (w // 4), num_classes)

    def embed(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x):
        return self.out(self.embed(x))


def build_model(arch: str, in_shape: tuple, num_classes: int, hidden: int = 64) -> nn.Module:
    """``in_shape`` is (C, H, W), the layout models receive."""
    if arch == "logreg":
        return LogReg(in_shape, num_classes)
    if arch == "mlp":
        return MLP(in_shape, num_classes, hidden)
    if arch == "small_cnn":
        return SmallCNN(in_shape, num_classes, hidden)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's model output: logit of the label minus logsumexp of the other logits.

    Works on any leading batch shape: logits [..., C], labels [...].
    """
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)

