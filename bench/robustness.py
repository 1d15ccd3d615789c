"""The robustness study on Fashion-MNIST: robust ensembles (Saligrama & Leclerc) and attacks on the
neural-response proxy (Guo et al.), with the cost of PGD adversarial training against plain training
on the same engine.

For each setting the study's assets run in-process (data, loader files, then the robustness
group) on a fresh home; the tables come from the warehouse.  Settings: ℓ∞ ε = 0.1 (the budget the
defaults were written for) and ℓ2 ε = 1.0 (not tuned on), both the MLP on 10,000 training
images, 1,000 attacked test images, PGD-5 in training, PGD-20 with 2 restarts in evaluation.

    python bench/robustness.py                 # both settings (about 30 min on 2 cores)
    python bench/robustness.py --settings linf
    python bench/robustness.py --quick         # digits, seconds

Fashion-MNIST comes from Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
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
    "training": {"epochs": 10, "batch_size": 128, "lr": 0.05},
}
SETTINGS = {
    "linf": {"norm": "linf", "eps": 0.1},
    "l2": {"norm": "l2", "eps": 1.0},
}
STUDY = {"steps": 5, "eval_steps": 20, "eval_restarts": 2, "eval_examples": 1000,
         "ensemble_sizes": [1, 2, 4], "eps_train": [0.5, 1.0], "eps_test": [0.5, 1.0, 2.0]}


def run_setting(name: str, spec: dict, tmp: Path) -> dict:
    import duckdb
    import yaml
    from dagster import AssetSelection, instance_for_test, materialize

    from assets import ALL_ASSETS, ALL_CHECKS
    from definitions import make_resources

    exp_dir = tmp / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    home = tmp / "home"
    t0 = time.perf_counter()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", [name])
        res = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=name, instance=instance,
                          selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth", "loader_files")
                          | AssetSelection.groups("robustness"), resources=make_resources(home, exp_dir))
        if not res.success:
            raise SystemExit(f"{name}: the study failed")
        meta = {e.asset_key.to_user_string(): e.materialization.metadata
                for e in res.get_asset_materialization_events()}
    seconds = time.perf_counter() - t0
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        table = conn.sql("SELECT * FROM robustness WHERE experiment = ? ORDER BY scheme, eps_train, k, eps_test",
                         params=[name]).pl()
        neural = conn.sql("SELECT * FROM neural_attacks WHERE experiment = ? ORDER BY surrogate, budget",
                          params=[name]).pl()
    models = meta["robust_models"]
    return {"table": table, "neural": neural, "claim": meta["robustness_eval"]["claim"].value,
            "neural_meta": {k: (v.value if hasattr(v, "value") else v) for k, v in meta["neural_response"].items()
                            if k in ("noise_ceiling", "readout_ev")},
            "cost": {k: models[k].value for k in ("models_per_hour_standard", "models_per_hour_adversarial",
                                                  "adversarial_cost")},
            "seconds": seconds}


def show(name: str, spec: dict, out: dict) -> None:
    t = out["table"]
    r = spec["robustness"]
    print(f"\n== {name}: {r['norm']} ε = {r['eps']}, {spec['model']['arch']} on "
          f"{spec['dataset']['source']} ({spec['dataset'].get('limit_train')} training images), "
          f"{len(t) and int(t['examples'][0])} attacked test images, {out['seconds']:.0f}s")
    keys = ["scheme", "eps_train", "k"]
    wide = t.group_by(keys, maintain_order=True).agg(pl.col("natural_accuracy").first().alias("natural")).join(
        t.with_columns(pl.format("robust@{}", pl.col("eps_test").round(4).cast(pl.String)).alias("at"))
        .pivot(on="at", index=keys, values="robust_accuracy"), on=keys, maintain_order="left")
    print(markdown(wide, digits=3))
    c = out["claim"]
    print(f"claim (ensembles of small-ε models withstand larger attacks): K={c['k'][1]} vs K={c['k'][0]} at "
          f"ε_train={c['eps_train']:g}: " + ", ".join(f"ε_test {e}: {v['single']:.3f} -> {v['ensemble']:.3f}"
                                                      for e, v in c["by_eps_test"].items())
          + f"; natural {c['natural']['single']:.3f} -> {c['natural']['ensemble']:.3f}: "
          + ("HELD" if c["held"] else "DID NOT HOLD")
          + ("" if not c["held"] else (", beyond 2 SE" if c["beyond_noise"] else ", but within 2 SE of no gain")))
    if "vs_one_large_eps_model" in c:
        v = c["vs_one_large_eps_model"]
        print(f"  against one model at ε_train={v['eps_train_large']:g}: natural {v['natural']['one_large']:.3f} vs "
              f"{v['natural']['ensemble_small']:.3f} (ensemble); robust " + ", ".join(
                  f"@{e}: {r['one_large']:.3f} vs {r['ensemble_small']:.3f}" for e, r in v["robust"].items()))
    print(f"neural proxy (noise ceiling {out['neural_meta']['noise_ceiling']}, readout EV "
          f"{out['neural_meta']['readout_ev']}):")
    print(markdown(out["neural"], drop=("experiment",), digits=3))
    cost = out["cost"]
    print(f"cost: {cost['models_per_hour_standard']:.0f} standard vs {cost['models_per_hour_adversarial']:.0f} "
          f"PGD-AT models/hour ({cost['adversarial_cost']:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from bench.results_file import write_results

    results, ratios, config = [], [], {"base": BASE, "study": STUDY, "settings": {}}
    for name in args.settings:
        spec = json.loads(json.dumps(BASE))
        study = {**STUDY, **SETTINGS[name]}
        if args.quick:
            spec["dataset"] = {"source": "digits", "limit_train": 400, "limit_test": 100}
            spec["model"]["hidden"] = 64
            spec["training"]["epochs"] = 5
            study.update(eval_steps=5, eval_restarts=1, eval_examples=100,
                         neural={"sites": 20, "images": 200, "repeats": 2, "attack_images": 20, "steps": 5})
            if name == "linf":
                study["eps"] = 0.1
        spec["robustness"] = study
        config["settings"][name] = study
        with tempfile.TemporaryDirectory() as tmp:
            out = run_setting(name, spec, Path(tmp))
        show(name, spec, out)
        case = f"{spec['dataset']['source']}-{name}"
        for row in out["table"].iter_rows(named=True):
            tag = f"{case}/{row['scheme']}/eps_train={row['eps_train']:g}/k={row['k']}/eps_test={row['eps_test']:g}"
            results.append({"case": tag, "system": "provenance", "metric": "robust_accuracy",
                            "value": float(row["robust_accuracy"]), "runs": 1})
            results.append({"case": tag, "system": "provenance", "metric": "natural_accuracy",
                            "value": float(row["natural_accuracy"]), "runs": 1})
        for row in out["neural"].iter_rows(named=True):
            tag = f"{case}/neural/{row['surrogate']}/budget={row['budget']:g}"
            for m in ("brain_change", "noise_change", "self_change", "readout_ev"):
                results.append({"case": tag, "system": "provenance", "metric": m, "value": float(row[m]),
                                "runs": 1})
        results.append({"case": case, "system": "provenance", "metric": "ensemble_claim_held",
                        "value": bool(out["claim"]["held"]), "runs": 1})
        cost = out["cost"]
        results += [{"case": case, "system": "pgd_at", "metric": "models_per_hour",
                     "value": cost["models_per_hour_adversarial"], "runs": 1},
                    {"case": case, "system": "standard", "metric": "models_per_hour",
                     "value": cost["models_per_hour_standard"], "runs": 1}]
        ratios.append({"case": case, "metric": "models_per_hour", "of": "pgd_at", "over": "standard",
                       "value": round(cost["models_per_hour_adversarial"] / cost["models_per_hour_standard"], 4)})
    write_results("robustness", config, results, ratios, quick=args.quick)


if __name__ == "__main__":
    main()
