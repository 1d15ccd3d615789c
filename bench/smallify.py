"""The Smallify study on Fashion-MNIST: a λ sweep of pruning during training against the best
statically sized network of a width grid with the same budget, for an MLP and a small CNN.

    python bench/smallify.py                 # both settings, Fashion-MNIST 10k; about 20 minutes on 2 cores
    python bench/smallify.py --settings mlp  # one of them
    python bench/smallify.py --quick         # digits, a couple of minutes

Prints, per setting, every network (parameters, accuracy, latency at batch 1 and 256, and against
the most accurate static network: how many times fewer parameters and how much faster) and how close
the best Smallify network comes to the paper's "35× smaller, 6× faster at similar accuracy"; writes
bench/results/smallify.json.  The peer side by side is the static width grid (no published code).
Latency: 1 thread, median of 30 passes (noisy on a shared machine: compare ratios).
Needs Debian's dataset-fashion-mnist (``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.tables import markdown  # noqa: E402

BASE = {"seed": 0, "dataset": {"source": "fashion_mnist", "limit_train": 10000, "limit_test": 2000}}
SETTINGS = {
    "mlp": {"arch": "mlp", "hidden": [512, 512], "lambdas": [0.0, 0.001, 0.003, 0.01, 0.03],
            "width_grid": [0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0], "epochs": 10, "batch_size": 64,
            "lr": 0.05},
    "cnn": {"arch": "cnn", "channels": [32, 64], "hidden": [128], "lambdas": [0.0, 0.003, 0.01, 0.03],
            "width_grid": [0.0625, 0.125, 0.25, 0.5, 1.0], "epochs": 6, "batch_size": 64, "lr": 0.05},
}


def run(spec: dict, tmp: Path) -> dict:
    import duckdb
    import yaml
    from dagster import AssetSelection, instance_for_test, materialize

    from assets import ALL_ASSETS, ALL_CHECKS
    from definitions import make_resources

    exp_dir = tmp / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "small.yaml").write_text(yaml.safe_dump(spec))
    home = tmp / "home"
    t0 = time.perf_counter()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["small"])
        res = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="small", instance=instance,
                          selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth", "loader_files")
                          | AssetSelection.groups("smallify"), resources=make_resources(home, exp_dir))
        if not res.success:
            raise SystemExit("the study failed")
        meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in res.get_asset_materialization_events()}
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        table = conn.sql("SELECT * FROM smallify ORDER BY kind, params").pl()
    return {"table": table, "claim": meta["smallify_runs"]["claim"].value, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from bench.results_file import write_results

    results, ratios, config = [], [], {"base": BASE, "settings": {}}
    for name in args.settings:
        study = dict(SETTINGS[name])
        spec = json.loads(json.dumps(BASE))
        if args.quick:
            spec["dataset"] = {"source": "digits"}
            study.update(epochs=min(study["epochs"], 8), hidden=[128, 128] if name == "mlp" else [64],
                         lambdas=study["lambdas"][::2])
        spec["smallify"] = study
        config["settings"][name] = study
        with tempfile.TemporaryDirectory() as tmp:
            out = run(spec, Path(tmp))
        t, c = out["table"], out["claim"]
        print(f"\n== {name} on {spec['dataset']['source']} ({out['seconds']:.0f}s)")
        print(markdown(t.drop("experiment", "seed", "seconds"), digits=4))
        if "smallify" in c:
            b = c["smallify"]
            line = (f"best Smallify within {c['tolerance']} of the most accurate static network: λ={b['lam']:g}, widths "
                    f"{b['widths']}, {b['params']:.0f} params, {b['params_ratio']:.1f}x smaller, "
                    f"{b['speedup_b256']:.1f}x faster at batch 256 (paper: 35x, 6x): "
                    + ("HELD" if c["held"] else "DID NOT HOLD"))
            if "smallest_similar_static" in c:
                s0 = c["smallest_similar_static"]
                line += (f"; the smallest static network within the same tolerance: widths {s0['widths']}, "
                         f"{s0['params']:.0f} params ({s0['params_ratio']:.1f}x smaller)")
            print(line)
        else:
            print(c.get("why"))
        case = f"{spec['dataset']['source']}-{name}"
        for row in t.iter_rows(named=True):
            system = f"smallify(lam={row['lam']:g})" if row["kind"] == "smallify" else f"static(x{row['width_frac']:g})"
            for m in ("params", "test_accuracy", "latency_b1_ms", "latency_b256_ms", "params_ratio", "speedup_b256"):
                results.append({"case": case, "system": system, "metric": m, "value": round(float(row[m]), 6),
                                "runs": 1})
        if "smallify" in c:
            ratios.append({"case": case, "metric": "params", "of": "most_accurate_static", "over": "best_smallify",
                           "value": round(c["smallify"]["params_ratio"], 3)})
            ratios.append({"case": case, "metric": "latency_b256", "of": "most_accurate_static",
                           "over": "best_smallify", "value": round(c["smallify"]["speedup_b256"], 3)})
        results.append({"case": case, "system": "provenance", "metric": "claim_35x_6x_held",
                        "value": bool(c["held"]), "runs": 1})
    write_results("smallify", config, results, ratios, quick=args.quick)


if __name__ == "__main__":
    main()
