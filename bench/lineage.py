"""Quality of the whole lineage on the demo spec, over seeds.

Runs ``experiments/demo.yaml`` (with its seed replaced) through the real pipeline, one seed after
another, each in a fresh home, and reads the figures back from the warehouse:

- LDS of TRAK and of datamodels (TRAK's peer here is the datamodels regression on the same models);
- the strongest-feature detector against spectral signatures (the baseline detector):
  AUROC and recall within the top |poisoned|;
- clean accuracy and attack success before and after retraining without the flagged set;
- wall-clock seconds of the whole run (reported, never asserted).

    python bench/lineage.py            # seeds 0 1 2 (about a minute each on 2 cores)
    python bench/lineage.py --quick    # a tiny spec, one seed, seconds
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402

QUICK = {"dataset": {"source": "digits", "limit_train": 300, "limit_test": 60},
         "attack": {"kind": "badnets", "target_class": 0, "poison_count": 20, "patch_size": 3},
         "model": {"arch": "mlp", "hidden": 32}, "training": {"epochs": 10, "batch_size": 32},
         "subsets": {"num_models": 24, "num_heldout": 8}, "trak": {"num_models": 4, "proj_dim": 32},
         "datamodels": {"n_lambdas": 4, "max_iter": 50}, "detector": {"restarts": 16}, "lds": {"min_heldout": 5}}


def run_seed(spec: dict, seed: int, work: Path) -> tuple[dict, float]:
    import duckdb

    name = f"bench_s{seed}"
    exp_dir, home = work / "experiments", work / f"home_s{seed}"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump({**spec, "seed": seed}))
    env = {**os.environ, "PROVENANCE_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", str(exp_dir / f"{name}.yaml"),
                           "--log-level", "WARNING"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        lds = dict(conn.execute("SELECT method, lds FROM lds WHERE experiment = ?", [name]).fetchall())
        det = {r[0]: {"auroc": r[1], "recall_at_budget": r[2], "precision": r[3], "recall": r[4], "flagged": r[5],
                      "retrain_accuracy": r[6], "retrain_asr": r[7]}
               for r in conn.execute("SELECT method, auroc, recall_at_budget, precision, recall, n_flagged, "
                                     "retrain_accuracy, retrain_attack_success_rate FROM backdoor_summary "
                                     "WHERE experiment = ?", [name]).fetchall()}
        full = conn.execute("SELECT accuracy, attack_success_rate FROM models WHERE experiment = ? AND role = 'full'",
                            [name]).fetchone()
        n_models = conn.execute("SELECT count(*) FROM models WHERE experiment = ?", [name]).fetchone()[0]
    return {"lds": lds, "detector": det, "accuracy": full[0], "asr": full[1], "models": n_models}, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny spec, one seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    spec = QUICK if args.quick else yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    spec.pop("description", None)
    seeds = args.seeds[:1] if args.quick else args.seeds
    results, ratios, table = [], [], []
    with tempfile.TemporaryDirectory(prefix="provenance-bench-") as tmp:
        for seed in seeds:
            r, seconds = run_seed(spec, seed, Path(tmp))
            case = f"{'quick' if args.quick else 'demo'}-seed{seed}"
            sf, ss = r["detector"]["strongest_feature"], r["detector"]["spectral_signatures"]
            rows = [("trak", "lds", r["lds"]["trak"]), ("datamodels", "lds", r["lds"]["datamodels"]),
                    ("strongest_feature", "auroc", sf["auroc"]), ("spectral_signatures", "auroc", ss["auroc"]),
                    ("strongest_feature", "recall_at_budget", sf["recall_at_budget"]),
                    ("spectral_signatures", "recall_at_budget", ss["recall_at_budget"]),
                    ("strongest_feature", "precision", sf["precision"]), ("strongest_feature", "recall", sf["recall"]),
                    ("full_model", "accuracy", r["accuracy"]), ("full_model", "attack_success_rate", r["asr"]),
                    ("retrained_without_flagged", "accuracy", sf["retrain_accuracy"]),
                    ("retrained_without_flagged", "attack_success_rate", sf["retrain_asr"]),
                    ("provenance", "seconds", round(seconds, 1))]
            for system, metric, value in rows:
                results.append({"case": case, "system": system, "metric": metric, "value": value, "runs": 1})
            for metric, ours, peer, a, b in (("lds", "trak", "datamodels", r["lds"]["trak"], r["lds"]["datamodels"]),
                                             ("auroc", "strongest_feature", "spectral_signatures", sf["auroc"], ss["auroc"]),
                                             ("recall_at_budget", "strongest_feature", "spectral_signatures",
                                              sf["recall_at_budget"], ss["recall_at_budget"])):
                ratios.append({"case": case, "metric": metric, "of": ours, "over": peer,
                               "value": round(a / b, 3) if a is not None and b else None})
            table.append((case, r["models"], r["lds"]["trak"], r["lds"]["datamodels"], sf["recall_at_budget"],
                          sf["auroc"], ss["auroc"], r["asr"], sf["retrain_asr"], seconds))
    header = ("case", "models", "LDS trak", "LDS dm", "SF r@|P|", "SF AUROC", "SS AUROC", "ASR", "ASR after", "s")
    print(" | ".join(f"{h:>10}" for h in header))
    fmt = lambda v: f"{v:10.3f}" if isinstance(v, float) else f"{str(v):>10}"  # noqa: E731
    for row in table:
        print(" | ".join(fmt(v) for v in row))
    write_results("lineage", {"spec": "quick" if args.quick else "experiments/demo.yaml", "seeds": seeds,
                      "peers": {"trak": "datamodels (LASSO on the same models)",
                                "strongest_feature": "spectral signatures (same flag budget)"}},
                  results, ratios, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
