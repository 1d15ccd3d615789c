"""The small CNN written the textbook way, for the benchmarks' plain PyTorch loops: the same
architecture, parameter names and initialisation as kernels.models.SmallCNN, but only PyTorch's
own ops (nn.Conv2d, ReLU, max-pool) — none of provenance's CPU kernels (kernels/conv_pool.py,
kernels/pool.py)."""
from __future__ import annotations

import torch

from kernels.models import SmallCNN
from kernels.pool import relu_maxpool2d


class TextbookSmallCNN(SmallCNN):
    def embed(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return x.flatten(1)


class PoolKernelSmallCNN(SmallCNN):
    """PyTorch's convolutions with kernels/pool.py's ReLU + max-pool (the engine before the fused
    first block), for the per-step ablation."""

    def embed(self, x):
        return relu_maxpool2d(self.conv2(relu_maxpool2d(self.conv1(x)))).flatten(1)
