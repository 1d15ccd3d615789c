"""Model architectures, the model output function (margin) and image preprocessing.

Models here have no batch-norm or other running state, so many of them can be stacked and
trained as one batched computation with torch.func (see kernels/train.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.archs import ARCHS, TORCHVISION
from kernels.conv_pool import conv3x3_relu_maxpool2d
from kernels.pool import relu_maxpool2d



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
    """Two 3x3 conv blocks (conv, ReLU, 2x2 max-pool), then a linear head; for 28x28 and 32x32
    images.  On the CPU the first block (few input channels, no input gradient) is one fused numba
    kernel (kernels/conv_pool.py), and the second block's ReLU + max-pool another
    (kernels/pool.py, channels-last); elsewhere (CUDA, torch.func transforms, NCHW) both are
    PyTorch's own ops, with the same parameters and results to rounding."""

    def __init__(self, in_shape, num_classes, hidden=32):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2 * hidden, 3, padding=1)
        self.out = nn.Linear(2 * hidden * (h // 4) * (w // 4), num_classes)

    def embed(self, x):
        x = conv3x3_relu_maxpool2d(x, self.conv1)
        x = relu_maxpool2d(self.conv2(x))
        return x.flatten(1)

    def forward(self, x):
        return self.out(self.embed(x))


def _conv_bn(c_in, c_out, k=3, stride=1, padding=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The KakaoBrain ResNet-9 of the FFCV / datamodels / TRAK CIFAR recipe (training-speed.md §2):
    widths 64-128-128-256-256-128, a 5x5 stride-2 convolution, output scaled by 0.2."""

    def __init__(self, in_shape, num_classes, width=64):
        super().__init__()
        c = in_shape[0]
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            _conv_bn(c, w1), _conv_bn(w1, w2, k=5, stride=2, padding=2),
            _Residual(nn.Sequential(_conv_bn(w2, w2), _conv_bn(w2, w2))),
            _conv_bn(w2, w3), nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn(w3, w3), _conv_bn(w3, w3))),
            _conv_bn(w3, w2, padding=0), nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten())
        self.out = nn.Linear(w2, num_classes, bias=False)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.out(self.embed(x)) * 0.2


class TorchvisionNet(nn.Module):
    """A torchvision classification model, randomly initialised (no download), for ``in_shape``
    inputs: single-channel images are repeated to the three channels torchvision models expect.
    ``embed`` is the input of the model's last linear layer (its penultimate features)."""

    def __init__(self, name, in_shape, num_classes):
        super().__init__()
        import torchvision

        if name not in torchvision_models():
            raise ValueError(f"unknown torchvision model {name!r}; choose one of torchvision.models.list_models()")
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        self.repeat = 3 if in_shape[0] == 1 else 1
        self.name = name

    def forward(self, x):
        out = self.net(x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x)
        return out.logits if hasattr(out, "logits") else out

    def embed(self, x):
        head = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not head:
            raise ValueError(f"torchvision model {self.name!r} has no linear head to take features before")
        seen = {}
        hook = head[-1].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        try:
            self.forward(x)
        finally:
            hook.remove()
        return seen["x"].flatten(1)


def torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def build_model(arch: str, in_shape: tuple, num_classes: int, hidden: int = 64) -> nn.Module:
    """``in_shape`` is (C, H, W), the layout models receive; ``hidden`` is the width
    (not used by torchvision models)."""
    if arch.startswith(TORCHVISION):
        return TorchvisionNet(arch[len(TORCHVISION):], in_shape, num_classes)
    if arch == "logreg":
        return LogReg(in_shape, num_classes)
    if arch == "mlp":
        return MLP(in_shape, num_classes, hidden)
    if arch == "small_cnn":
        return SmallCNN(in_shape, num_classes, hidden)
    if arch == "resnet9":
        return ResNet9(in_shape, num_classes, hidden)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS} or torchvision.<model name>")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's model output: logit of the label minus logsumexp of the other logits.

    Works on any leading batch shape: logits [..., C], labels [...].
    """
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)

