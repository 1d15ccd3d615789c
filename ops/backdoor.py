"""Backdoor report: the strongest-feature detector on the train x train TRAK matrix, spectral
signatures as the baseline, metrics against poison_truth, and a retrain without the flagged set."""
from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kernels.local_search import auto_flag, strongest_feature_scores
from kernels.spectral import spectral_scores
from kernels.stats import detection_metrics
from kernels.train import train_stacked, unstack
from ops.spec import Spec
from ops.store import ArtifactStore
from ops.training import Data, evaluate, load_models, model_seed, recipe_of

REPORT = "backdoor_report"
Log = Callable[[str], None]


def detector_matrix(tau_train: np.ndarray, q_mean: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The influence matrix the search runs on (see docs/decisions.md, "Detector input").

    1. Divide out TRAK's out-to-loss weight Q: it shrinks exactly the examples a backdoor fits
       well (the poisons), and is a per-column scale, not influence.
    2. Centre every (label of target, label of source) block at zero: examples of one class
       support each other, and on small homogeneous datasets that class feature is stronger than
       any trigger.  After centring, a set scores only for influence beyond what its labels
       explain, and the search looks for the strongest feature other than the label.
    """
    a = np.asarray(tau_train, np.float64) / np.maximum(np.asarray(q_mean, np.float64), 1e-12)[None, :]
    a = a.copy()
    np.fill_diagonal(a, np.nan)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    for ia in members:
        for ic in members:
            block = a[np.ix_(ia, ic)]
            a[np.ix_(ia, ic)] = block - np.nanmean(block)
    np.fill_diagonal(a, 0.0)
    return a


def _retrain_without(spec, make_model, data, flagged, target):
    keep = np.flatnonzero(~flagged)
    params = train_stacked(make_model, data.x, data.y, [keep], [model_seed(spec, 10**6)], recipe_of(spec))
    ev = evaluate(make_model, params, data, target, spec.training.tta_flip)
    return float(ev["accuracy"][0]), float(ev["asr"][0])


def backdoor_report(spec: Spec, store: ArtifactStore, exp: str, device: torch.device, log: Log) -> dict:
    d = spec.detector
    tau = store.load_npy(exp, "attribution_scores", "train_x_train.npy")
    q_mean = store.load_npy(exp, "attribution_scores", "q_mean.npy")
    labels = np.asarray(store.load_npy(exp, "training_set", "train_labels.npy"))
    truth_raw = np.asarray(store.load_npy(exp, "training_set", "poisoned.npy"))
    meta = store.load_json(exp, "training_set", "meta.json")
    has_truth = bool((truth_raw >= 0).all())
    truth = truth_raw == 1
    n = len(labels)

    t0 = time.perf_counter()
    a = detector_matrix(tau, q_mean, labels)
    sf = strongest_feature_scores(a, sizes=d.sizes, restarts=d.restarts, swaps=d.swaps,
                                  max_passes=d.max_passes, seed=spec.seed, size_exponent=d.size_exponent,
                                  on_size=lambda i, k, size: log(f"local search: size {size} "
                                                                 f"({i + 1}/{k}, {time.perf_counter() - t0:.1f}s)"))
    if d.flag_count is not None:
        flags_sf = np.zeros(n, bool)
        flags_sf[np.argsort(-sf, kind="stable")[: d.flag_count]] = True
    else:
        flags_sf = auto_flag(sf, d.min_separation)
    budget = int(flags_sf.sum())

    make_model, params, meta_ckpt = load_models(spec, store, exp)
    data = Data(store, exp, device, norm=json.loads(meta_ckpt["norm"]))
    model = make_model().to(device)
    model.load_state_dict(unstack(params, int(meta_ckpt["models"]) - 1))   # the model on all data
    with torch.no_grad():
        feats = model.embed(data.x).cpu().numpy()
    ss = spectral_scores(feats, labels)
    flags_ss = np.zeros(n, bool)
    flags_ss[np.argsort(-ss, kind="stable")[:budget]] = True

    rows, summary = [], []
    for method, scores, flags in (("strongest_feature", sf, flags_sf), ("spectral_signatures", ss, flags_ss)):
        order = np.argsort(-scores, kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(1, n + 1)
        rows.append(pd.DataFrame({
            "experiment": exp, "method": method, "train_index": np.arange(n), "example_id": meta["train_ids"],
            "score": scores.astype(np.float64), "rank": rank, "flagged": flags,
            "poisoned": pd.array(np.where(truth, True, False) if has_truth else [None] * n, dtype="boolean")}))
        m = detection_metrics(scores, flags, truth) if has_truth and truth.any() else {
            "n_poisoned": int(truth.sum()) if has_truth else None, "n_flagged": int(flags.sum()),
            "precision": None, "recall": None, "recall_at_budget": None, "auroc": None}
        summary.append({"experiment": exp, "method": method, **m})
        log(f"{method}: flagged {int(flags.sum())}" + (f", precision {m['precision']}, recall {m['recall']}, "
                                                         f"AUROC {m['auroc']}" if has_truth else ""))
    target = meta["target_class"]
    clean_acc = asr = None
    if d.retrain and flags_sf.any():
        clean_acc, asr = _retrain_without(spec, make_model, data, flags_sf, target)
        log(f"retrained without the {budget} flagged examples: accuracy {clean_acc:.3f}"
            + (f", attack success {asr:.3f}" if asr is not None and not np.isnan(asr) else ""))
    for s in summary:
        s["retrain_accuracy"] = clean_acc if s["method"] == "strongest_feature" else None
        s["retrain_attack_success_rate"] = (None if asr is None or np.isnan(asr) else asr) \
            if s["method"] == "strongest_feature" else None
    store.save_table(exp, REPORT, "scores.parquet", pd.concat(rows, ignore_index=True))
    summary_df = pd.DataFrame(summary)
    for col in ("n_poisoned", "n_flagged"):
        summary_df[col] = summary_df[col].astype("Int64")
    store.save_table(exp, REPORT, "summary.parquet", summary_df)
    return {"truth_known": has_truth, "flagged": budget, "seconds": round(time.perf_counter() - t0, 1),
            **{f"{s['method']}_{k}": s[k] for s in summary for k in ("precision", "recall", "recall_at_budget", "auroc")},
            "retrain_accuracy": clean_acc, "retrain_attack_success_rate": asr}

