"""Backdoor detection across attacks, rates and seeds: the strongest-feature detector against the
three baselines (spectral signatures, activation clustering, SPECTRE-style robust covariance).

Every setting runs the real pipeline stages (ops: data, attack, loader files, masks, training,
TRAK, the backdoor report with its retraining) on Fashion-MNIST (10,000 training and 2,000 test
images, small CNN of width 32, 10 epochs, 20 models on random halves, TRAK with k = 256), in its
own experiment under ``--home``; trained models and TRAK features are reused when the same
setting runs again.  Per method it records AUROC, recall at 1% FPR, precision/recall of the
flagged set (no method is told the poison rate), and clean accuracy / attack success of a
model retrained without the flagged set, next to a model retrained without exactly the true
poisons (the reference).  Variants of the detector run on the same data as extra rows
(detection metrics only; ``--variants`` picks them, VARIANTS lists them): ``test_center`` is the
previous default (TRAK's matrix with Q divided out, labels centred at their clean test mean, the
paper's global search), ``global`` the default kernel with the paper's global search instead of
the global + per-label one, ``double_center`` centres every label at its own training mean (no
clean data needed), ``membership`` scores by the paper's aggregation of search membership instead
of the within-label support, and ``paper`` is the paper as written (TRAK's matrix as it is,
membership scores, global search).

    python bench/backdoor.py                          # every setting, seeds 0 1 2 (hours on 2 cores)
    python bench/backdoor.py --settings blend-5 --seeds 0
    python bench/backdoor.py --quick                  # digits, two settings, one seed: a minute
    python bench/backdoor.py --merge bench/results/backdoor-s0.json bench/results/backdoor-s1.json
                                                      # runs made separately, into backdoor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402

SETTINGS = {
    "badnets-1": {"kind": "badnets", "poison_rate": 0.01, "patch_size": 3},
    "badnets-3": {"kind": "badnets", "poison_rate": 0.03, "patch_size": 3},
    "badnets-10": {"kind": "badnets", "poison_rate": 0.10, "patch_size": 3},
    "blend-5": {"kind": "blend", "poison_rate": 0.05, "blend_alpha": 0.1},
    "badnets-all2all-10": {"kind": "badnets", "poison_rate": 0.10, "patch_size": 3, "mapping": "all_to_all",
                           "patch_pattern": "checkerboard"},
    "sig-5": {"kind": "sig", "poison_rate": 0.05, "sig_delta": 30, "sig_test_delta": 60, "sig_frequency": 6},
}
# settings never used to choose the detector's design (run by name: --settings blend-2 ...): the two
# sets of the report (a low-opacity blend on 2%, a small checkerboard on 0.5%), a random
# 3x3 pattern at a random spot aimed at another class, and no attack at all (what gets flagged)
HELDOUT = {
    "clean": {"kind": "none"},
    "blend-2": {"kind": "blend", "poison_rate": 0.02, "blend_alpha": 0.1},
    "checker-0.5": {"kind": "badnets", "poison_rate": 0.005, "patch_size": 3, "patch_pattern": "checkerboard"},
    "random-3-t5": {"kind": "badnets", "poison_rate": 0.03, "patch_size": 3, "patch_pattern": "random",
                    "patch_location": "random", "target_class": 5},
}
# settings whose target the issue fixes: recall >= 0.9 at FPR <= 1%
RECALL_TARGET = ("badnets-3", "badnets-10", "blend-5")
# the baselines the mean-AUROC target names (the other rows are variants and diagnostics)
BASELINES = ("spectral_signatures", "activation_clustering", "spectre")

BASE = {"dataset": {"source": "fashion_mnist", "limit_train": 10000, "limit_test": 2000},
        "model": {"arch": "small_cnn", "hidden": 32},
        "training": {"epochs": 10, "batch_size": 64, "lr": 0.05},
        "subsets": {"num_models": 20, "num_heldout": 2}, "trak": {"num_models": 20, "proj_dim": 256}}
QUICK = {"dataset": {"source": "digits", "limit_train": 600, "limit_test": 150},
         "model": {"arch": "mlp", "hidden": 32}, "training": {"epochs": 10, "batch_size": 32},
         "subsets": {"num_models": 40, "num_heldout": 2}, "trak": {"num_models": 40, "proj_dim": 64},
         "detector": {"restarts": 32}}
QUICK_SETTINGS = {"badnets-8": {"kind": "badnets", "poison_rate": 0.08, "patch_size": 3},
                  "blend-8": {"kind": "blend", "poison_rate": 0.08, "blend_alpha": 0.2}}


# rows beside strongest_feature (the spec's defaults, with retraining): the same detector with these
# detector settings, on the same matrices (detection metrics only)
VARIANTS = {
    "test_center": {"prepare": "divide_q_test_center", "search": "global"},   # the default before clean_whiten
    "global": {"search": "global"},                                            # clean_whiten, the paper's search
    "double_center": {"prepare": "divide_q_double_center", "search": "global"},
    "membership": {"score": "membership"},
    "paper": {"prepare": "paper", "score": "membership", "search": "global"},
    "center": {"prepare": "divide_q_center", "score": "membership", "search": "global"},
}


# bump when a code change alters what the upstream stages produce, so stored runs are rebuilt
# (2: Q as sigmoid(-margin), which no longer rounds to 0 on examples fitted to float precision)
UPSTREAM_VERSION = 2


def build_upstream(spec, store, exp: str, dev, log) -> float:
    """Data, attack, loader files, masks, models, TRAK features and scores of one setting, unless the
    store already holds them for the same spec (all but ``detector``) and UPSTREAM_VERSION."""
    from ops import attribution as A
    from ops import data as D
    from ops import training as T
    from ops.backdoor import stable_keys

    stamp = store.path(exp, "bench_upstream.json")
    upstream = {**{k: v for k, v in spec.model_dump(mode="json").items() if k != "detector"},
                "upstream_version": UPSTREAM_VERSION}
    stable_keys(upstream)      # keys added since runs were stored, at the values that reproduce them
    t0 = time.perf_counter()
    if not stamp.exists() or json.loads(stamp.read_text()) != upstream:
        for stage in (D.raw_dataset, D.training_set, D.loader_files, D.subset_masks):
            stage(spec, store, exp)
        for jobs in T.plan_shards(spec, store, exp, log):
            T.train_shard(spec, store, exp, jobs, dev, log)
        T.collect_models(spec, store, exp, log)
        A.gradient_features(spec, store, exp, dev, log)
        A.attribution_scores(spec, store, exp, log)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(upstream))
    return time.perf_counter() - t0


# a stored run is reused only if the code that made it is unchanged
REPORT_CODE = ("kernels/local_search.py", "kernels/baselines.py", "kernels/spectral.py", "kernels/stats.py",
               "kernels/trak.py", "kernels/train.py", "ops/detectors.py", "ops/backdoor.py", "ops/training.py",
               "ops/attribution.py", "bench/backdoor.py")


def _code_digest() -> str:
    import hashlib

    h = hashlib.sha256()
    for f in REPORT_CODE:
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def _plain(v):
    """JSON-able: numpy scalars to Python, missing values to None."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    return v


def run_setting(name: str, attack: dict, seed: int, base: dict, home: Path,
                variants=("test_center", "global", "paper"), reuse: bool = True) -> dict:
    """One setting at one seed: upstream (reused when stored), the report with its retraining and the
    variants' rows.  The finished run is stored beside the experiment and reused when the spec, the
    variants and the code (REPORT_CODE) are the same."""
    import torch

    from ops import backdoor as B
    from ops import training as T
    from ops.detectors import DETECTORS, Inputs
    from ops.spec import parse_spec
    from ops.store import ArtifactStore
    from kernels.stats import detection_metrics

    exp = f"{name}-s{seed}"
    spec = parse_spec({**base, "name": exp, "seed": seed, "attack": {"target_class": 0, **attack}})
    store = ArtifactStore(home)
    log = lambda m: print(f"  [{exp}] {m}", flush=True)  # noqa: E731
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    upstream_s = build_upstream(spec, store, exp, dev, log)
    key = {"spec": spec.model_dump(mode="json"), "variants": list(variants), "code": _code_digest()}
    if reuse and store.path(exp, "bench", "report.json").exists():
        stored = store.load_json(exp, "bench", "report.json")
        if stored.get("key") == key:
            log("report reused (same spec, variants and code)")
            return stored["result"]
    summary = B.backdoor_report(spec, store, exp, dev, log)
    table = store.load_table(exp, B.REPORT, "summary.parquet")
    models = store.load_table(exp, T.CKPT, "models.parquet")
    full = models.filter(models["role"] == "full").row(0, named=True)
    rows = table.to_dicts()
    # the same detector with other settings on the same matrices: what each departure from the paper changes
    labels = np.asarray(store.load_npy(exp, "training_set", "train_labels.npy"))
    truth = np.asarray(store.load_npy(exp, "training_set", "poisoned.npy")) == 1
    for variant in variants:
        alt = parse_spec({**spec.model_dump(mode="json"),
                          "detector": {**spec.detector.model_dump(mode="json"), **VARIANTS[variant]}})
        t1 = time.perf_counter()
        det = DETECTORS["strongest_feature"](Inputs(alt, store, exp, dev, log, labels))
        rows.append({"method": f"strongest_feature_{variant}",
                     **detection_metrics(det.scores, det.flags, truth), "seconds": time.perf_counter() - t1})
    asr = full["attack_success_rate"]
    result = _plain({"setting": name, "seed": seed, "experiment": exp, "rows": rows, "poisoned": int(truth.sum()),
                     "model_accuracy": float(full["accuracy"]),
                     "model_attack_success": None if asr is None or asr != asr else float(asr),
                     "upstream_seconds": upstream_s, "report_seconds": summary["seconds"]})
    store.save_json(exp, "bench", "report.json", {"key": key, "result": result})
    return result


def _f(v, d=3):
    return "  n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{d}f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="*", help=f"subset of {', '.join(SETTINGS)} (the default), or of the "
                                                  f"held-out settings {', '.join(HELDOUT)}")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--home", default=str(ROOT / "bench" / ".backdoor-work"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["test_center", "global", "paper"],
                    help=f"detector variants as extra rows strongest_feature_<variant>, of {', '.join(VARIANTS)}")
    ap.add_argument("--rerun", action="store_true", help="recompute reports even where a stored run matches")
    ap.add_argument("--tag", default="", help="suffix of the results file (bench/results/backdoor<tag>.json)")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                    help="run nothing: join results files written by separate runs (e.g. one per seed) into "
                         "bench/results/backdoor<tag>.json, with the ratios over all their runs")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.tag)
    settings = QUICK_SETTINGS if args.quick else {**SETTINGS, **HELDOUT}
    base = QUICK if args.quick else BASE
    names = args.settings or list(QUICK_SETTINGS if args.quick else SETTINGS)
    seeds = [0] if args.quick else args.seeds
    unknown = [s for s in names if s not in settings]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        print(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if unknown:
        print(f"unknown setting(s) {unknown}; choose from {', '.join(settings)}", file=sys.stderr)
        return 2
    runs = []
    config = {"settings": {n: settings[n] for n in names}, "seeds": seeds, "base": base,
              "variants": {v: VARIANTS[v] for v in args.variants}}
    for name in names:
        for seed in seeds:
            print(f"{name} seed {seed}", flush=True)
            runs.append(run_setting(name, settings[name], seed, base, Path(args.home), args.variants,
                                    reuse=not args.rerun))
            last = name == names[-1] and seed == seeds[-1]
            summarize(runs, config, args, final=last)   # the results file holds every finished run
    return 0


def summarize(runs: list, config: dict, args, final: bool) -> None:
    out = print if final else (lambda *a, **k: None)
    methods = []
    for r in runs:
        for row in r["rows"]:
            if row["method"] not in methods:
                methods.append(row["method"])
    out(f"\n{'setting':20s} {'seed':>4s} {'method':31s} {'AUROC':>6s} {'r@1%FPR':>7s} {'flag':>5s} "
          f"{'prec':>5s} {'rec':>5s} {'re-acc':>6s} {'re-ASR':>6s}")
    results = []
    for r in runs:
        out(f"{r['setting']:20s} {r['seed']:4d} model on all data: accuracy {r['model_accuracy']:.3f}, attack "
              f"success {_f(r['model_attack_success'])}; {r['poisoned']} poisons; reference (true poisons "
              f"removed): accuracy {_f(r['rows'][0].get('reference_accuracy'))}, "
              f"ASR {_f(r['rows'][0].get('reference_attack_success_rate'))}")
        for row in r["rows"]:
            out(f"{'':20s} {'':4s} {row['method']:31s} {_f(row['auroc']):>6s} {_f(row['recall_at_fpr01']):>7s} "
                  f"{row['n_flagged']:5d} {_f(row['precision'], 2):>5s} {_f(row['recall'], 2):>5s} "
                  f"{_f(row.get('retrain_accuracy')):>6s} {_f(row.get('retrain_attack_success_rate')):>6s}")
            case = f"{r['setting']}/s{r['seed']}"
            for metric in ("auroc", "recall_at_fpr01", "precision", "recall", "retrain_accuracy",
                           "retrain_attack_success_rate", "seconds"):
                v = row.get(metric)
                if v is not None and not (isinstance(v, float) and v != v):
                    results.append({"case": case, "system": row["method"], "metric": metric, "value": float(v),
                                    "runs": 1})
        if r["rows"][0].get("reference_accuracy") is not None:
            results.append({"case": f"{r['setting']}/s{r['seed']}", "system": "reference_true_poisons_removed",
                            "metric": "retrain_accuracy", "value": r["rows"][0]["reference_accuracy"], "runs": 1})

    def mean_of(method, metric, subset=None):
        vals = [row[metric] for r in runs if subset is None or r["setting"] in subset
                for row in r["rows"] if row["method"] == method and row.get(metric) is not None
                and row[metric] == row[metric]]
        return float(np.mean(vals)) if vals else None

    names = list(dict.fromkeys(r["setting"] for r in runs))
    if len(runs) > len(names):
        out(f"\nper setting, mean over seeds: AUROC / recall@1%FPR / attack success after retraining")
        out(f"  {'method':31s} " + " ".join(f"{n[:18]:>18s}" for n in names))
        for m in methods:
            cells = [f"{_f(mean_of(m, 'auroc', [n]))}/{_f(mean_of(m, 'recall_at_fpr01', [n]), 2)}/"
                     f"{_f(mean_of(m, 'retrain_attack_success_rate', [n]), 2)}" for n in names]
            out(f"  {m:31s} " + " ".join(f"{c:>18s}" for c in cells))
    out(f"\nmean over {len(runs)} runs   AUROC   recall@1%FPR")
    for m in methods:
        out(f"  {m:31s} {_f(mean_of(m, 'auroc'))}  {_f(mean_of(m, 'recall_at_fpr01'))}")
    ours = mean_of("strongest_feature", "auroc")
    ratios = _auroc_ratios(lambda m: mean_of(m, "auroc"))
    out("\ntargets (issue 11):")
    sel = [r for r in runs if r["setting"] in RECALL_TARGET]
    for r in sel:
        row = next(x for x in r["rows"] if x["method"] == "strongest_feature")
        out(f"  recall@1%FPR >= 0.9 on {r['experiment']}: {_f(row['recall_at_fpr01'])} "
              f"{'met' if row['recall_at_fpr01'] >= 0.9 else 'NOT met'}")
    for m in methods:
        if m in BASELINES and ours is not None and mean_of(m, "auroc") is not None:
            out(f"  mean AUROC above {m}: {_f(ours)} vs {_f(mean_of(m, 'auroc'))} "
                  f"{'met' if ours > mean_of(m, 'auroc') else 'NOT met'}")
    for r in runs:
        row = next(x for x in r["rows"] if x["method"] == "strongest_feature")
        if not r["poisoned"]:                 # no attack: what gets flagged, and what removing it costs
            out(f"  no attack on {r['experiment']}: flagged {row['n_flagged']}; retrained accuracy "
                f"{_f(row.get('retrain_accuracy'))} vs {r['model_accuracy']:.3f} on all data")
            continue
        asr, acc, ref = row.get("retrain_attack_success_rate"), row.get("retrain_accuracy"), row.get("reference_accuracy")
        ok = asr is not None and acc is not None and ref is not None and asr <= 0.05 and acc >= ref - 0.01
        out(f"  after retraining on {r['experiment']}: ASR {_f(asr)} (<= 0.05), accuracy {_f(acc)} vs reference "
              f"{_f(ref)} (within 0.01): {'met' if ok else 'NOT met'}")
        out(f"  detector time on {r['experiment']}: {_f(row['seconds'], 1)} s (< 120 s): "
              f"{'met' if row['seconds'] < 120 else 'NOT met'}")
    write_results("backdoor", config, results, ratios, quick=args.quick, tag=args.tag)


def _auroc_ratios(mean_auroc) -> list[dict]:
    """The detector's mean AUROC over each baseline's (BENCH.md's ratio rows)."""
    ours = mean_auroc("strongest_feature")
    return [{"case": "all", "metric": "auroc", "of": "strongest_feature", "over": m,
             "value": round(ours / mean_auroc(m), 4)} for m in BASELINES if ours is not None and mean_auroc(m)]


def merge(files: list[str], tag: str) -> int:
    """One results file from several (each a list of per-run rows): the rows joined, the config's
    settings and seeds united, the AUROC ratios recomputed over every run."""
    docs = []
    for f in files:
        try:
            d = json.loads(Path(f).read_text())
            assert d.get("bench") == "backdoor" and isinstance(d.get("results"), list)
        except (OSError, ValueError, AssertionError):
            print(f"{f}: not a results file of bench/backdoor.py", file=sys.stderr)
            return 2
        docs.append(d)
    cases = [r["case"] for d in docs for r in d["results"] if r["metric"] == "auroc"
             and r["system"] == "strongest_feature"]
    dup = sorted({c for c in cases if cases.count(c) > 1})
    if dup:
        print(f"the same run in more than one file: {', '.join(dup)}", file=sys.stderr)
        return 2
    results = [r for d in docs for r in d["results"]]
    config = {**docs[0]["config"], "merged_from": [str(f) for f in files],
              "settings": {k: v for d in docs for k, v in d["config"]["settings"].items()},
              "seeds": sorted({s for d in docs for s in d["config"]["seeds"]})}

    def mean_of(system):
        v = [r["value"] for r in results if r["system"] == system and r["metric"] == "auroc"]
        return float(np.mean(v)) if v else None

    ratios = _auroc_ratios(mean_of)
    systems = list(dict.fromkeys(r["system"] for r in results if r["metric"] == "auroc"))
    print(f"mean over {len(cases)} runs   AUROC   recall@1%FPR")
    for m in systems:
        r1 = [r["value"] for r in results if r["system"] == m and r["metric"] == "recall_at_fpr01"]
        print(f"  {m:31s} {_f(mean_of(m))}  {_f(float(np.mean(r1)) if r1 else None)}")
    write_results("backdoor", config, results, ratios, tag=tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
