"""Test accuracy of the small CNN on all of Fashion-MNIST with the spec's default recipe.

    python bench/accuracy.py            # 60,000 train / 10,000 test, default recipe (30 epochs)
    python bench/accuracy.py --quick    # 6,000 / 1,000, 3 epochs

Trains through the engine (kernels/train.py, resident data) exactly as the checkpoints asset
does, with `ops.spec.TrainingSpec()` defaults and `ModelSpec(arch="small_cnn")` width: two
models (seeds 0 and 1) at once, one per core on the CPU; both accuracies are reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args()
    import torch

    from bench.results_file import write_results
    from kernels.models import build_model
    from kernels.train import predict_stacked, train_stacked, uses_bf16
    from ops.sources import load_source
    from ops.spec import DatasetSpec, TrainingSpec, parse_spec
    from ops.training import recipe_of

    torch.set_num_threads(os.cpu_count() or 1)
    ds = DatasetSpec(source="fashion_mnist", limit_train=6000 if args.quick else None,
                     limit_test=1000 if args.quick else None)
    raw = load_source(ds, 0)
    training = TrainingSpec(epochs=3) if args.quick else TrainingSpec()
    spec = parse_spec({"name": "accuracy", "model": {"arch": "small_cnn", "hidden": args.hidden},
                       "training": training.model_dump()})
    x = torch.tensor(raw.images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    tr = ~raw.is_test
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = (x - mean) / std
    y = torch.tensor(raw.labels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = x.to(device), y.to(device)
    make = lambda: build_model("small_cnn", (1, 28, 28), 10, args.hidden)  # noqa: E731
    t0 = time.perf_counter()
    recipe = recipe_of(spec)
    precision = "bf16" if uses_bf16(recipe, make(), device) else "fp32"
    seeds = [0, 1]
    params = train_stacked(make, x[torch.from_numpy(tr).to(device)], y[torch.from_numpy(tr).to(device)],
                           [np.arange(int(tr.sum()))] * len(seeds), seeds, recipe,
                           on_epoch=lambda e, loss: print(f"epoch {e + 1}: loss {loss:.4f}", flush=True))
    seconds = time.perf_counter() - t0
    te = torch.from_numpy(raw.is_test).to(device)
    accs = (predict_stacked(make, params, x[te], tta_flip=spec.training.tta_flip).argmax(-1) == y[te]).float().mean(1)
    accs = [round(float(a), 4) for a in accs]
    acc = min(accs)
    print(f"small_cnn (hidden={args.hidden}) on {int(tr.sum())} Fashion-MNIST images, {spec.training.epochs} epochs, "
          f"{precision}: test accuracy {accs} (seeds {seeds}, {int(raw.is_test.sum())} test images), "
          f"{seconds:.0f}s for {len(seeds)} models")
    write_results("accuracy", {"model": f"small_cnn hidden={args.hidden}",
                                            "recipe": spec.training.model_dump(), "train": int(tr.sum()),
                                            "precision": precision, "seeds": seeds, "accuracy_per_seed": accs,
                                            "test": int(raw.is_test.sum())},
                  [{"case": "fmnist-full" if not args.quick else "fmnist-quick", "system": "provenance",
                        "metric": "test_accuracy_min_over_seeds", "value": acc, "runs": len(seeds)},
                       {"case": "fmnist-full" if not args.quick else "fmnist-quick", "system": "provenance",
                        "metric": "seconds", "value": round(seconds, 1), "runs": 1}],
                  [], args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
