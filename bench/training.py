"""Models per hour: provenance's training engine vs a plain PyTorch loop, side by side.

The plain loop is what one writes by hand: one model at a time, batches from
``torch.utils.data.DataLoader`` over a ``Subset`` of the training set, the same model written
with PyTorch's own ops (bench/textbook.py: none of provenance's CPU kernels), optimizer,
learning-rate schedule, batch size and epochs, float32 in PyTorch's default layout, all cores on
the one model.  The engine trains the same models from resident tensors (kernels/train.py): many
in lockstep where that pays (small models); convolutional models on the CPU one per core,
channels-last, with the fused first block (kernels/conv_pool.py) and the numba ReLU + max-pool
(kernels/pool.py) and, on CPUs with native bfloat16, bfloat16
autocast (the recipe's ``amp="auto"``).  Same data, same α = 0.5 subsets; each system runs in a
process of its own (the engine sets glibc's malloc to keep freed memory, process-wide, and the
plain loop must not profit from it), warmed up, and runs alternate (engine, plain, ...) one at a
time; medians are reported.

To show what the engine adds beyond precision and layout, the CNN case also runs the plain loop
with the engine's precision, layout and model kernels (bfloat16 autocast where the engine uses
it, channels-last, the fused first block and numba pool): ``plain_pytorch_bf16_cl``; and the
engine with its models on threads of one process instead of worker processes
(``PROVENANCE_CPU_WORKERS=threads``): ``provenance_threads``.

Cases (CPU):
  fmnist-smallcnn  small CNN (width 32) on Fashion-MNIST (synthetic if not installed), α = 0.5
  digits-mlp       the demo's MLP on scikit-learn digits, α = 0.5
Case (GPU, when CUDA is present):
  cifar-resnet9    ResNet-9 (the FFCV/datamodels recipe model) on CIFAR-shaped data, α = 0.5,
                   bf16 autocast + channels-last; also compared with the arithmetic limit of the GPU

    python bench/training.py [--quick]
"""
from __future__ import annotations

import argparse
import gzip
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402
from bench.textbook import TextbookSmallCNN  # noqa: E402
from kernels.models import build_model  # noqa: E402
from kernels.train import Recipe, current_optimizer, make_optimizers, train_stacked, uses_bf16  # noqa: E402

RESNET9_FWD_GFLOP = 0.583   # per 32x32 image (shared/reference/training-speed.md §3)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def fashion(n=None):
    p = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    if p.exists():
        x = np.frombuffer(gzip.open(p).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        y = np.frombuffer(gzip.open(p.with_name("train-labels-idx1-ubyte.gz")).read(), np.uint8, offset=8)
        what = "fashion_mnist"
    else:
        rng = np.random.default_rng(0)
        x, y, what = rng.integers(0, 256, (60000, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 60000), "synthetic"
    x, y = x[:n], y[:n]
    xf = torch.tensor(x, dtype=torch.float32) / 255.0
    return (xf - xf.mean()) / xf.std(), torch.tensor(y.astype(np.int64)), what


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    return (x - x.mean()) / x.std(), torch.tensor(d.target), "digits"


def plain_loop(make, x, y, subset, seed, recipe: Recipe, device, tuned=False):
    """One model, the textbook way; ``tuned``: with the engine's precision and layout on the CPU."""
    torch.manual_seed(seed)
    model = make().to(device)
    amp = (recipe.amp is True and device.type == "cuda") or (tuned and uses_bf16(recipe, model, device))
    channels_last = (recipe.channels_last and device.type == "cuda") or tuned
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opts = make_optimizers(recipe, model.parameters())
    ds = torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), subset.tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=recipe.batch_size, shuffle=True,
                                         pin_memory=device.type == "cuda")
    total, step = math.ceil(len(subset) / recipe.batch_size) * recipe.epochs, 0
    for _ in range(recipe.epochs):
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt, lr = current_optimizer(recipe, opts, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(xb).float(), yb, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model


def engine(make, x, y, subsets, seeds, recipe, device):
    out = train_stacked(make, x.to(device), y.to(device), subsets, seeds, recipe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


CASES = ("fmnist-smallcnn", "digits-mlp", "cifar-resnet9")   # the last needs CUDA


def build_case(name: str, quick: bool) -> tuple:
    """(make, make_plain, x, y, recipe, device, n_engine, data, tuned_plain) of one case; each
    system's process builds its own (models are closures, data is big: neither is sent between
    processes)."""
    cpu = torch.device("cpu")
    if name == "fmnist-smallcnn":
        x, y, what = fashion(6000 if quick else None)
        rec = Recipe(epochs=1 if quick else 2, batch_size=64, lr=0.05)      # amp="auto", the default
        return (lambda: build_model("small_cnn", (1, 28, 28), 10, 32), lambda: TextbookSmallCNN((1, 28, 28), 10, 32),
                x, y, rec, cpu, 2 if quick else 4, what, True)
    if name == "digits-mlp":
        xd, yd, _ = digits()
        mlp = lambda: build_model("mlp", (1, 8, 8), 10, 64)   # noqa: E731
        return mlp, mlp, xd, yd, Recipe(epochs=30, batch_size=64, lr=0.05), cpu, 64 if quick else 256, "digits", False
    n = 10000 if quick else 50000
    g = torch.Generator().manual_seed(0)
    xc, yc = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    rr = Recipe(epochs=2 if quick else 4, batch_size=512, lr=0.5, label_smoothing=0.1, amp=True, channels_last=True)
    resnet9 = lambda: build_model("resnet9", (3, 32, 32), 10, 64)   # noqa: E731
    return resnet9, resnet9, xc, yc, rr, torch.device("cuda"), 2, "random CIFAR-shaped", False


def systems_of(tuned_plain: bool) -> list[str]:
    return ["provenance", "plain_pytorch"] + (["plain_pytorch_bf16_cl", "provenance_threads"] if tuned_plain else [])


def system_process(conn, case_name: str, system: str, quick: bool) -> None:
    """One system of one case, in a process of its own: warms up, then for each round number
    received runs once and sends back models per hour.  Separate processes keep what a system
    does to its process (the engine's malloc settings, thread pools, oneDNN and numba caches)
    from reaching the other system."""
    torch.set_num_threads(os.cpu_count() or 1)
    make, make_plain, x, y, recipe, device, n_engine, _, _ = build_case(case_name, quick)
    rng = np.random.default_rng(0)
    n = len(y)
    subsets = [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(n_engine)]
    one_epoch = Recipe(**{**recipe.__dict__, "epochs": 1})
    if system in ("provenance", "provenance_threads"):
        if system == "provenance_threads":
            os.environ["PROVENANCE_CPU_WORKERS"] = "threads"
        else:
            os.environ.pop("PROVENANCE_CPU_WORKERS", None)    # the default: worker processes
        models = n_engine
        run = lambda r, rec: engine(make, x, y, subsets, list(range(r * 100, r * 100 + n_engine)), rec, device)  # noqa: E731
    else:
        tuned = system == "plain_pytorch_bf16_cl"
        models = 1
        run = lambda r, rec: plain_loop(make if tuned else make_plain, x, y, subsets[0], r, rec, device,  # noqa: E731
                                        tuned=tuned)
    run(0, one_epoch)   # warm-up
    conn.send("ready")
    while (r := conn.recv()) is not None:
        t0 = time.perf_counter()
        run(r, recipe)
        conn.send(3600 * models / (time.perf_counter() - t0))


def answer(p, conn):
    """The next message from a system's process, or an error if the process died."""
    mp.connection.wait([conn, p.sentinel])
    if not conn.poll():
        raise RuntimeError(f"a benchmark process exited with code {p.exitcode} (its traceback is above)")
    return conn.recv()


def run_case(case_name: str, systems: list[str], runs: int, quick: bool) -> dict:
    """Models per hour of each system, per run: {system: [runs]}.  Each system runs in its own
    process; rounds alternate the systems (one at a time, so they never share the cores)."""
    ctx = mp.get_context("spawn")
    procs = {}
    try:
        for s in systems:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=system_process, args=(child, case_name, s, quick))   # not daemonic: the
            p.start()                                                                 # engine starts workers
            procs[s] = (p, parent)
            if answer(p, parent) != "ready":    # warm up one at a time
                raise RuntimeError(f"{s} did not start")
        out = {s: [] for s in systems}
        for r in range(runs):
            for s in systems:
                procs[s][1].send(r)
                out[s].append(answer(*procs[s]))
        return out
    finally:
        for p, conn in procs.values():
            try:
                conn.send(None)
            except OSError:
                pass
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    results, ratios, rows, config = [], [], [], {}
    for name in CASES:
        if name == "cifar-resnet9" and not torch.cuda.is_available():
            continue
        make, make_plain, xx, yy, recipe, device, n_engine, data, tuned = build_case(name, args.quick)
        per_run = run_case(name, systems_of(tuned), runs, args.quick)
        med = {sys_: statistics.median(v) for sys_, v in per_run.items()}
        config[name] = {"data": data, "examples": len(yy), "alpha": 0.5, "device": str(device),
                        "engine_models_per_run": n_engine, "recipe": {k: v for k, v in recipe.__dict__.items()},
                        "engine_precision": "bf16" if uses_bf16(recipe, make(), device) else "fp32"}
        results += [{"case": name, "system": sys_, "metric": "models_per_hour", "value": round(v, 1), "runs": runs}
                    for sys_, v in med.items()]
        ratios += [{"case": name, "metric": "models_per_hour", "of": "provenance", "over": sys_,
                    "value": round(med["provenance"] / v, 2),   # ratio of medians; and per run, paired in time:
                    "paired_runs": [round(a / b, 2) for a, b in zip(per_run["provenance"], per_run[sys_])]}
                   for sys_, v in med.items() if sys_ != "provenance"]
        rows.append((name, med, per_run))
        if name == "cifar-resnet9":
            gpu_name = torch.cuda.get_device_name(0)
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
            flop = 3 * RESNET9_FWD_GFLOP * 1e9 * (len(yy) // 2) * recipe.epochs
            limit = 3600 * peak * 1e12 / flop if peak else None
            results.append({"case": name, "system": "arithmetic_limit", "metric": "models_per_hour",
                            "value": round(limit, 1) if limit else None,
                            "note": f"3 x {RESNET9_FWD_GFLOP} GFLOP/image x {len(yy) // 2} images x {recipe.epochs} "
                                    f"epochs at {peak} dense bf16 TFLOP/s ({gpu_name})"})
            if limit:
                ratios.append({"case": name, "metric": "models_per_hour", "of": "provenance", "over": "arithmetic_limit",
                               "value": round(med["provenance"] / limit, 3)})
    print(f"{'case':<18}{'system':<24}{'models/hour':>12}{'ratio':>8}   runs [paired ratios]")
    for name, med, per_run in rows:
        for sys_, v in med.items():
            ratio = "" if sys_ == "provenance" else f"{med['provenance'] / v:.2f}x"
            paired = "" if sys_ == "provenance" else \
                f" [{', '.join(f'{a / b:.2f}' for a, b in zip(per_run['provenance'], per_run[sys_]))}]"
            print(f"{name:<18}{sys_:<24}{v:>12,.0f}{ratio:>8}   {[round(r) for r in per_run[sys_]]}{paired}")
    for r in ratios:
        if r["over"] == "arithmetic_limit":
            print(f"{r['case']}: provenance at {r['value']:.1%} of the GPU's arithmetic limit")
    gpu_tag = ("-" + torch.cuda.get_device_name(0).split()[1].lower()) if torch.cuda.is_available() else ""
    write_results("training", config, results, ratios, args.quick, gpu_tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
