"""Where the small CNN's CPU training step spends its time: one step (batch 64, 28x28, width 32,
SGD) under each of the engine's choices, against the textbook step, in the same run.

Variants, each a full forward + backward + optimizer step on resident tensors:
  textbook-2threads   float32, PyTorch's default (NCHW) layout and ops, both cores on the one model
  nchw-fp32           the same on one thread
  cl-fp32             channels-last, PyTorch's ops
  cl-fp32-fused       channels-last, the fused first block (kernels/conv_pool.py) + numba pool
  cl-bf16             channels-last, bfloat16 autocast, PyTorch's ops
  cl-bf16-numba       channels-last, bfloat16 autocast, PyTorch's convolutions, numba pools
                      (kernels/pool.py)
  cl-bf16-fused       channels-last, bfloat16 autocast, fused first block + numba pool (one
                      engine model)
  engine-per-core     cl-bf16-fused, one model per core on threads: ms per model-step

and the first block alone (conv 1 -> 32, ReLU, 2x2 max-pool; channels-last bf16, one thread),
forward + backward: PyTorch's ops + the numba pool (``first-block-pool``) against the fused kernel
(``first-block-fused``, kernels/conv_pool.py).

Rounds alternate the variants after a warm-up; medians of the rounds are reported.  The ratio is
textbook-2threads over the variant (time: bigger is faster).

    python bench/cpu_step.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402
from bench.textbook import PoolKernelSmallCNN, TextbookSmallCNN  # noqa: E402
from kernels.conv_pool import conv3x3_relu_maxpool2d  # noqa: E402
from kernels.models import SmallCNN  # noqa: E402
from kernels.pool import relu_maxpool2d  # noqa: E402
from kernels.train import cpu_has_native_bf16  # noqa: E402


def make_step(model_cls, channels_last: bool, bf16: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = model_cls((1, 28, 28), 10, 32)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_first_block(fused: bool):
    """Forward + backward of the small CNN's first block on a batch of 64 (bf16 autocast)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 32, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 28, 28)
    g = torch.randn(64, 32, 14, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def block():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv3x3_relu_maxpool2d(x, conv) if fused else relu_maxpool2d(conv(x))
        y.backward(g)
    return block


def timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e3


def per_core(steps, n: int) -> float:
    """ms per model-step with one model per thread."""
    threads = [threading.Thread(target=lambda s=s: [s() for _ in range(n)]) for s in steps]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) / n / len(steps) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    n, rounds = (10, 2) if args.quick else (40, 5)
    bf16 = cpu_has_native_bf16()
    variants = {
        "nchw-fp32": (TextbookSmallCNN, False, False),
        "cl-fp32": (TextbookSmallCNN, True, False),
        "cl-fp32-fused": (SmallCNN, True, False),
        "cl-bf16": (TextbookSmallCNN, True, True),
        "cl-bf16-numba": (PoolKernelSmallCNN, True, True),
        "cl-bf16-fused": (SmallCNN, True, True),
    }
    steps = {name: make_step(*v) for name, v in variants.items()}
    textbook = make_step(TextbookSmallCNN, False, False)
    engine = [make_step(SmallCNN, True, True, seed) for seed in range(cores)]
    blocks = {"first-block-pool": make_first_block(False), "first-block-fused": make_first_block(True)}
    out = {name: [] for name in ["textbook-2threads", *variants, "engine-per-core", *blocks]}
    for r in range(rounds + 1):                      # round 0 warms up (oneDNN primitives, numba)
        torch.set_num_threads(cores)
        t = timed(textbook, n)
        torch.set_num_threads(1)
        got = {"textbook-2threads": t, **{name: timed(s, n) for name, s in steps.items()},
               "engine-per-core": per_core(engine, n), **{name: timed(b, n) for name, b in blocks.items()}}
        if r:
            for k, v in got.items():
                out[k].append(v)
    torch.set_num_threads(cores)
    med = {k: statistics.median(v) for k, v in out.items()}
    base = med["textbook-2threads"]
    print(f"{'variant':<20}{'ms/step':>9}{'speed-up':>10}   rounds (ms)   [bf16 native: {bf16}]")
    for k, v in med.items():
        ref = med["first-block-pool"] if k in blocks else base
        print(f"{k:<20}{v:>9.2f}{ref / v:>9.2f}x   {[round(x, 2) for x in out[k]]}")
    step_med = {k: v for k, v in med.items() if k not in blocks}
    write_results("cpu_step", {"model": "small_cnn width 32", "input": "1x28x28", "batch": 64, "steps_per_round": n,
                               "bf16_native": bf16, "note": "engine-per-core is ms per model-step, one model per core; "
                               "first-block-* time the first block alone (forward + backward, bf16, one thread)"},
                  [{"case": "smallcnn-step", "system": k, "metric": "ms_per_step", "value": round(v, 3), "runs": rounds}
                   for k, v in step_med.items()]
                  + [{"case": "first-block", "system": k, "metric": "ms_per_call", "value": round(med[k], 3), "runs": rounds}
                     for k in blocks],
                  [{"case": "smallcnn-step", "metric": "ms_per_step", "of": k, "over": "textbook-2threads",
                    "value": round(base / v, 2)} for k, v in step_med.items() if k != "textbook-2threads"]
                  + [{"case": "first-block", "metric": "ms_per_call", "of": "first-block-fused", "over": "first-block-pool",
                      "value": round(med["first-block-pool"] / med["first-block-fused"], 2)}], args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
