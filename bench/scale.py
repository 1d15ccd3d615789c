"""Attribution at the TRAK paper's scale within a memory budget: time per stage and peak memory.

CIFAR-shaped synthetic data (random 3x32x32 images, 10 labels), n = 50,000 training examples and
10,000 targets, k = 2,048, the repository's ResNet-9 with random weights (memory and time do not
depend on what the weights learned), one checkpoint:

1. featurize with ``trak.projector`` (factored by default) -- on the 2-core CPU timed on a slice of
   the training set and extrapolated (``--featurize``); the rest of the feature rows are filled
   with random features block by block, so the files are sized for all 50,000 examples and both
   scorings run on all of them;
2. finalize: ΦᵀΦ (float64), its inverse, F = Φ(ΦᵀΦ + λI)^{-1} written by row blocks;
3. score test x train (10,000 x 50,000) and train x train (50,000 x 50,000, 10 GB) tile by tile.

Prints time per stage and the peak RSS (and peak GPU memory on CUDA) after each, and writes
bench/results/scale[-<gpu>].json.  No peer runs here: traker at this scale holds its scores in
GPU memory (trak.md §6, #45); the figure to beat is the issue's budget, peak RSS <= 8 GiB.

    python bench/scale.py                 # the full run (about 10 minutes on 2 cores)
    python bench/scale.py --quick         # n = 5,000, 1,000 targets
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402
from kernels.models import build_model  # noqa: E402
from kernels.npyio import NpyFile  # noqa: E402
from kernels.projectors import batched_out_to_loss, make_projector  # noqa: E402
from kernels.trak import finalize_member, score_tiles  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--targets", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--projector", default="factored", choices=["dense", "factored"])
    ap.add_argument("--memory-gb", type=float, default=2.0, help="trak.memory_gb")
    ap.add_argument("--featurize", type=int, default=None,
                    help="examples actually featurized (default: all on CUDA, 1,024 on the CPU)")
    ap.add_argument("--dir", default=None, help="where the feature and score files go (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.targets = 5000, 1000
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_feat = args.featurize or (args.n if device.type == "cuda" else min(args.n, 1024))
    budget = args.memory_gb * 2**30
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="provenance-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, stages = [], {}
    torch.manual_seed(0)
    model = build_model("resnet9", (3, 32, 32), 10, 64).to(device)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)

    def images(count):       # normalized CIFAR-shaped images, made in batches (never all at once)
        x = torch.randint(0, 256, (count, 3, 32, 32), generator=gen, dtype=torch.uint8)
        return ((x.float() / 255 - 0.5) / 0.25).to(device), torch.randint(0, 10, (count,), generator=gen).to(device)

    try:
        k, n, t = args.k, args.n, args.targets
        train = NpyFile.create(work / "train.npy", (1, n, k), np.float32)
        test = NpyFile.create(work / "test.npy", (1, t, k), np.float32)
        proj = make_projector(args.projector, model, params, k, seed=0, memory_bytes=budget, device=device)
        x0, _ = images(8)
        chunk = proj.chunk(x0)
        # 1. featurize
        warm_x, warm_y = images(min(chunk, 64))
        proj(warm_x, warm_y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n_feat:
            c = min(chunk, n_feat - done)
            x, y = images(c)
            train.write_rows(0, done, proj(x, y).cpu().numpy())
            done += c
        if device.type == "cuda":
            torch.cuda.synchronize()
        feat_s = time.perf_counter() - t0
        rate = n_feat / feat_s
        rng = np.random.default_rng(2)       # the rest of the rows: random features, block by block
        scale = float(np.sqrt(np.mean(train.rows(0, 0, min(n_feat, 256)) ** 2)))
        for r in range(n_feat, n, 8192):
            train.write_rows(0, r, (rng.standard_normal((min(8192, n - r), k)) * scale).astype(np.float32))
        for r in range(0, t, 8192):
            test.write_rows(0, r, (rng.standard_normal((min(8192, t - r), k)) * scale).astype(np.float32))
        x, y = images(min(n, 2048))
        q = np.concatenate([batched_out_to_loss(model, params, x, y, chunk).cpu().numpy()] * (n // len(x) + 1))[:n]
        stages["featurize"] = {"seconds_measured": feat_s, "examples": n_feat, "ex_per_s": rate,
                               "seconds_for_all": (n + t) / rate, "chunk": chunk}
        stages["featurize"].update(peak_rss_gib=peak_rss_gib(), peak_gpu_gib=peak_gpu_gib())
        print(f"featurize ({args.projector}, chunk {chunk}): {rate:.0f} examples/s on {n_feat} examples "
              f"-> {(n + t) / rate:.0f} s for all {n + t}; peak RSS {peak_rss_gib():.2f} GiB")
        # 2. finalize
        feats = NpyFile.create(work / "features.npy", (1, n, k), np.float32)
        t0 = time.perf_counter()
        finalize_member(train, 0, 0.01, feats, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stages["finalize"] = {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib(),
                              "peak_gpu_gib": peak_gpu_gib()}
        print(f"finalize (ΦᵀΦ, inverse, F): {stages['finalize']['seconds']:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")
        # 3. scores
        for name, targets, count in (("score_test_x_train", test, t), ("score_train_x_train", train, n)):
            out = NpyFile.create(work / f"{name}.npy", (count, n), np.float32)
            t0 = time.perf_counter()
            score_tiles(targets, feats, q, out, device, budget)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.close()
            stages[name] = {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib(),
                            "peak_gpu_gib": peak_gpu_gib(), "file_gib": (work / f"{name}.npy").stat().st_size / 2**30}
            print(f"{name} ({count} x {n}): {stages[name]['seconds']:.1f} s, file {stages[name]['file_gib']:.1f} GiB; "
                  f"peak RSS {peak_rss_gib():.2f} GiB")
            (work / f"{name}.npy").unlink()
        for f in (train, test, feats):
            f.close()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    case = f"resnet9-n{args.n}-t{args.targets}-k{args.k}-{args.projector}"
    rows.append({"case": case, "system": "provenance", "metric": "featurize_ex_per_s",
                 "value": stages["featurize"]["ex_per_s"], "runs": 1,
                 "note": f"measured on {n_feat} examples, chunk {stages['featurize']['chunk']}"})
    for s in ("finalize", "score_test_x_train", "score_train_x_train"):
        rows.append({"case": case, "system": "provenance", "metric": f"{s}_seconds", "value": stages[s]["seconds"],
                     "runs": 1})
    rows.append({"case": case, "system": "provenance", "metric": "peak_rss_gib", "value": peak_rss_gib(), "runs": 1,
                 "note": f"budget trak.memory_gb = {args.memory_gb}; target <= 8 GiB"})
    if device.type == "cuda":
        rows.append({"case": case, "system": "provenance", "metric": "peak_gpu_gib", "value": peak_gpu_gib(), "runs": 1})
    rows.append({"case": case, "system": "traker", "metric": "peak_rss_gib", "value": None, "runs": 0,
                 "note": "not run: the bench is about the budget; traker's featurization is compared in bench/attribution.py"})
    print(f"\n{'stage':<22}{'seconds':>10}{'peak RSS GiB':>14}")
    print(f"{'featurize (all, est.)':<22}{stages['featurize']['seconds_for_all']:>10.0f}"
          f"{stages['featurize']['peak_rss_gib']:>14.2f}")
    for s in ("finalize", "score_test_x_train", "score_train_x_train"):
        print(f"{s:<22}{stages[s]['seconds']:>10.1f}{stages[s]['peak_rss_gib']:>14.2f}")
    gpu = torch.cuda.get_device_name(0).split()[-1].lower() if device.type == "cuda" else ""
    write_results("scale", {"n": args.n, "targets": args.targets, "k": args.k, "projector": args.projector,
                            "memory_gb": args.memory_gb, "featurized": n_feat, "device": str(device),
                            "stages": stages}, rows, [], quick=args.quick, tag=f"-{gpu}" if gpu else "")


if __name__ == "__main__":
    main()
