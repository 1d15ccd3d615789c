"""The two-regimes study on Fashion-MNIST: learning-rate schedules at one epoch budget over seeds,
and the momentum / learning-rate equivalence of the large-step phase (Leclerc & Madry).

    python bench/regimes.py            # Fashion-MNIST 10k, MLP; about 10 minutes on 2 cores
    python bench/regimes.py --quick    # digits, a minute

Prints the accuracy table (mean ± sd over seeds), the momentum sweep and which claims held, and
writes bench/results/regimes.json.  The peer side by side is the schedules themselves: step and
one-cycle are the baselines two_regime is compared with (there is no published code to run).
Needs Debian's dataset-fashion-mnist (``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.tables import markdown  # noqa: E402

BASE = {
    "seed": 0,
    "dataset": {"source": "fashion_mnist", "limit_train": 10000, "limit_test": 2000},
    "model": {"arch": "mlp", "hidden": 256},
    "training": {"epochs": 12, "batch_size": 128, "lr": 0.1},
    "regimes": {"seeds": 3, "small_lr": 0.01, "momenta": [0.5, 0.9], "equivalence_epochs": 6},
}
QUICK = {"dataset": {"source": "digits"}, "training": {"epochs": 8, "batch_size": 64, "lr": 0.1},
         "model": {"arch": "mlp", "hidden": 128}}


def run(spec: dict, tmp: Path) -> dict:
    import duckdb
    import yaml
    from dagster import AssetSelection, instance_for_test, materialize

    from assets import ALL_ASSETS, ALL_CHECKS
    from definitions import make_resources

    exp_dir = tmp / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "regimes.yaml").write_text(yaml.safe_dump(spec))
    home = tmp / "home"
    t0 = time.perf_counter()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["regimes"])
        res = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="regimes", instance=instance,
                          selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth", "loader_files")
                          | AssetSelection.groups("regimes"), resources=make_resources(home, exp_dir))
        if not res.success:
            raise SystemExit("the study failed")
        meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in res.get_asset_materialization_events()}
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        def q(sql):
            return conn.sql(sql).pl()
        runs = q("SELECT * FROM regimes ORDER BY schedule, seed")
        eq = q("SELECT * FROM momentum_equivalence ORDER BY momentum, corrected DESC")
    return {"runs": runs, "eq": eq, "claims": meta["regimes_runs"]["claims"].value,
            "timing": meta["regimes_runs"]["seconds"].value, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args()
    from bench.results_file import write_results

    spec = json.loads(json.dumps(BASE))
    if args.quick:
        for k, v in QUICK.items():
            spec[k] = {**spec[k], **v} if k != "dataset" else v
    if args.seeds:
        spec["regimes"]["seeds"] = args.seeds
    with tempfile.TemporaryDirectory() as tmp:
        out = run(spec, Path(tmp))
    runs = out["runs"]
    acc = runs.group_by("schedule", maintain_order=True).agg(
        mean=pl.col("test_accuracy").mean(), sd=pl.col("test_accuracy").std(), min=pl.col("test_accuracy").min(),
        max=pl.col("test_accuracy").max(), final_loss=pl.col("final_train_loss").first()).sort("mean", descending=True)
    src = spec["dataset"]["source"]
    print(f"\n== {src}, {spec['model']['arch']} {spec['model']['hidden']}, {spec['training']['epochs']} epochs, "
          f"lr {spec['training']['lr']}, small_lr {spec['regimes']['small_lr']}, {spec['regimes']['seeds']} seeds "
          f"({out['seconds']:.0f}s)")
    print(markdown(acc, digits=4))
    print("\nmomentum / learning-rate equivalence (constant rate, "
          f"{spec['regimes']['equivalence_epochs']} epochs; curve_gap: mean |Δ log loss| from plain SGD):")
    print(markdown(out["eq"], drop=("experiment",), digits=4))
    print("\nclaims:")
    for name, c in out["claims"].items():
        print(f"  {name}: {'HELD' if c['held'] else 'DID NOT HOLD'}  "
              + ", ".join(f"{k} {v:.4f}" for k, v in c.items() if isinstance(v, float)))
    case = f"{src}-mlp{spec['model']['hidden']}-{spec['training']['epochs']}ep"
    results, ratios = [], []
    for row in acc.iter_rows(named=True):
        results.append({"case": case, "system": row["schedule"], "metric": "test_accuracy_mean",
                        "value": round(row["mean"], 4), "runs": spec["regimes"]["seeds"]})
        results.append({"case": case, "system": row["schedule"], "metric": "test_accuracy_sd",
                        "value": round(row["sd"] or 0.0, 4), "runs": spec["regimes"]["seeds"]})
    means = {r["schedule"]: r["mean"] for r in acc.iter_rows(named=True)}
    for other in ("step", "triangular", "small_only"):
        if other in means and "two_regime" in means:
            ratios.append({"case": case, "metric": "test_accuracy", "of": "two_regime", "over": other,
                           "value": round(means["two_regime"] / means[other], 4)})
    for row in out["eq"].iter_rows(named=True):
        tag = f"{case}/momentum={row['momentum']:g}/{'corrected' if row['corrected'] else 'uncorrected'}"
        results.append({"case": tag, "system": "provenance", "metric": "curve_gap", "value": round(row["curve_gap"], 4),
                        "runs": spec["regimes"]["seeds"]})
    for name, c in out["claims"].items():
        results.append({"case": case, "system": "provenance", "metric": f"claim/{name}", "value": bool(c["held"]),
                        "runs": 1})
    write_results("regimes", {"spec": spec}, results, ratios, quick=args.quick)


if __name__ == "__main__":
    main()
