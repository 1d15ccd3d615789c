"""Backdoor report: every registered detector (ops/detectors.py) on the same experiment, metrics
against poison_truth, a model retrained without each method's flagged set, and a model retrained
without exactly the true poisons (the reference a filter can at best reach)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from kernels.stats import detection_metrics
from kernels.train import train_stacked
from ops.detectors import DETECTORS, Inputs
from ops.spec import Spec
from ops.store import ArtifactStore
from ops.training import evaluate, model_seed, recipe_of

REPORT = "backdoor_report"
Log = Callable[[str], None]
METRICS = ("precision", "recall", "recall_at_budget", "recall_at_fpr01", "auroc")


# bump when retraining changes what it returns for the same spec and mask, so stored results are redone
RETRAIN_VERSION = 1


def stable_keys(body: dict) -> dict:
    """Drop from a spec dump the keys added after results were stored under keys without them,
    where they hold the value that reproduces those results: trak.memory_gb (chunk and tile sizes
    only), trak.projector = dense (the features the dense projector always made), lds.bootstrap."""
    body.get("trak", {}).pop("memory_gb", None)
    if body.get("trak", {}).get("projector") == "dense":
        body["trak"].pop("projector")
    body.get("lds", {}).pop("bootstrap", None)
    return body


def retrain_key(spec: Spec, store: ArtifactStore, exp: str, drop: np.ndarray) -> str:
    """What a retraining result depends on: the spec but its detector section and name (data, attack,
    model, recipe, seed), the training set's identity (its ids) and the dropped examples."""
    h = hashlib.sha256()
    body = {k: v for k, v in spec.model_dump(mode="json").items() if k not in ("detector", "name")}
    stable_keys(body)
    h.update(json.dumps({**body, "retrain_version": RETRAIN_VERSION}, sort_keys=True).encode())
    h.update(store.require(exp, "training_set", "meta.json").read_bytes())
    h.update(np.packbits(np.asarray(drop, bool)).tobytes())
    h.update(str(len(drop)).encode())
    return h.hexdigest()[:20]


def retrain_without(spec: Spec, inp: Inputs, drop: np.ndarray, target) -> tuple[float, float | None]:
    """Clean accuracy and attack success of one model trained on the examples not in ``drop``.

    The result is stored under ``backdoor_report/retrain/`` keyed by :func:`retrain_key`, so a report
    rerun with other detector settings retrains only the methods whose flagged sets changed (the
    same spec, seed and mask train the same model)."""
    name = f"retrain/{retrain_key(spec, inp.store, inp.exp, drop)}.json"
    if inp.store.path(inp.exp, REPORT, name).exists():
        got = inp.store.load_json(inp.exp, REPORT, name)
        return float(got["accuracy"]), got["attack_success_rate"]
    make_model, _, _, data = inp.models
    keep = np.flatnonzero(~drop)
    params = train_stacked(make_model, data.x, data.y, [keep], [model_seed(spec, 10**6)], recipe_of(spec))
    ev = evaluate(make_model, params, data, target, spec.training.tta_flip)
    asr = float(ev["asr"][0])
    out = float(ev["accuracy"][0]), None if np.isnan(asr) else asr
    inp.store.save_json(inp.exp, REPORT, name, {"accuracy": out[0], "attack_success_rate": out[1],
                                                "dropped": int(np.asarray(drop, bool).sum())})
    return out


def top_grid(images: np.ndarray, order: np.ndarray, truth: np.ndarray | None, count: int = 32,
             cols: int = 8, scale: int = 3, captions: list[str] | None = None) -> bytes:
    """PNG of the ``count`` highest-ranked training images, a red frame around true poisons and,
    under each, its caption (``captions[i]``: rank and training label)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    idx = order[:count]
    h, w, c = images.shape[1:]
    pad, text_h = 2, 12 if captions is not None else 0
    cw, ch = (w + 2 * pad) * scale, (h + 2 * pad) * scale + text_h
    cw = max(cw, 56 if captions is not None else cw)          # room for a short caption
    rows = (len(idx) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for t, i in enumerate(idx):
        r, col = divmod(t, cols)
        x, y = col * cw, r * ch
        cell = np.full((h + 2 * pad, w + 2 * pad, 3), 255, np.uint8)
        if truth is not None and truth[i]:
            cell[:] = (220, 30, 30)
        img = images[i]
        cell[pad:pad + h, pad:pad + w] = img if c == 3 else np.repeat(img, 3, axis=2)
        tile = Image.fromarray(cell).resize(((w + 2 * pad) * scale, (h + 2 * pad) * scale), Image.NEAREST)
        canvas.paste(tile, (x + (cw - tile.width) // 2, y))
        if captions is not None:
            draw.text((x + 2, y + tile.height), f"{t + 1}. {captions[i]}", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    return buf.getvalue()


def backdoor_report(spec: Spec, store: ArtifactStore, exp: str, device: torch.device, log: Log) -> dict:
    d = spec.detector
    labels = np.asarray(store.load_npy(exp, "training_set", "train_labels.npy"))
    truth_raw = np.asarray(store.load_npy(exp, "training_set", "poisoned.npy"))
    meta = store.load_json(exp, "training_set", "meta.json")
    has_truth = bool((truth_raw >= 0).all())
    truth = truth_raw == 1
    n = len(labels)
    inp = Inputs(spec, store, exp, device, log, labels)
    target = meta["target_class"]

    t_all = time.perf_counter()
    rows, summary, detections = [], [], {}
    failed = {}
    for method in d.methods:
        t0 = time.perf_counter()
        try:
            det = DETECTORS[method](inp)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
            if method == "strongest_feature":   # the report's own detector: its failure fails the report
                raise
            # a baseline that cannot run on this data (e.g. SPECTRE's robust covariance on images
            # without variance) is recorded as failed, not allowed to take the report down with it
            failed[method] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{method}: failed on this data ({failed[method]}); the report goes on without it")
            summary.append({"experiment": exp, "method": method, "n_poisoned": int(truth.sum()) if has_truth else None,
                            "n_flagged": 0, **{k: None for k in METRICS}, "flag_rule": f"failed: {failed[method]}",
                            "seconds": round(time.perf_counter() - t0, 2), "retrain_accuracy": None,
                            "retrain_attack_success_rate": None})
            continue
        det.seconds = time.perf_counter() - t0
        detections[method] = det
        scores, flags = np.asarray(det.scores, np.float64), np.asarray(det.flags, bool)
        order = np.argsort(-scores, kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(1, n + 1)
        rows.append(pl.DataFrame({
            "experiment": exp, "method": method, "train_index": np.arange(n), "example_id": meta["train_ids"],
            "score": scores, "rank": rank, "flagged": flags,
            "poisoned": pl.Series(truth.tolist() if has_truth else [None] * n, dtype=pl.Boolean)}))
        if has_truth and truth.any():
            m = detection_metrics(scores, flags, truth)
        else:
            m = {"n_poisoned": int(truth.sum()) if has_truth else None, "n_flagged": int(flags.sum()),
                 **{k: None for k in METRICS}}
        row = {"experiment": exp, "method": method, **m, "flag_rule": det.rule, "seconds": round(det.seconds, 2),
               "retrain_accuracy": None, "retrain_attack_success_rate": None}
        summary.append(row)
        log(f"{method}: flagged {int(flags.sum())} in {det.seconds:.1f}s" + (
            f", precision {m['precision']:.3f}, recall {m['recall']:.3f}, AUROC {m['auroc']:.3f}, "
            f"recall at 1% FPR {m['recall_at_fpr01']:.3f}" if has_truth and truth.any() else ""))

    reference = (None, None)
    if d.retrain:
        for row in summary:
            if row["method"] in failed:
                continue
            flags = np.asarray(detections[row["method"]].flags, bool)
            if flags.any():
                acc, asr = retrain_without(spec, inp, flags, target)
                row["retrain_accuracy"], row["retrain_attack_success_rate"] = acc, asr
                log(f"{row['method']}: retrained without its {int(flags.sum())} flagged examples: accuracy "
                    f"{acc:.3f}" + (f", attack success {asr:.3f}" if asr is not None else ""))
        if has_truth and truth.any():
            reference = retrain_without(spec, inp, truth, target)
            log(f"reference: retrained without the {int(truth.sum())} true poisons: accuracy {reference[0]:.3f}"
                + (f", attack success {reference[1]:.3f}" if reference[1] is not None else ""))
    for row in summary:
        row["reference_accuracy"], row["reference_attack_success_rate"] = reference

    images = np.asarray(store.load_npy(exp, "training_set", "train_images.npy"))
    if not detections:
        raise ValueError(f"detector.methods: every detector failed on this data ({failed})")
    first = next(m for m in d.methods if m in detections)
    names = [str(c) for c in meta["classes"]]
    grid = top_grid(images, np.argsort(-np.asarray(detections[first].scores), kind="stable"),
                    truth if has_truth else None, captions=[names[int(v)] for v in labels])
    with store.atomic(exp, REPORT, "top_flagged.png") as tmp:
        tmp.write_bytes(grid)
    store.save_table(exp, REPORT, "scores.parquet", pl.concat(rows))
    floats = (*METRICS, "retrain_accuracy", "retrain_attack_success_rate", "reference_accuracy",
              "reference_attack_success_rate")
    summary_df = pl.DataFrame(summary, schema_overrides={"n_poisoned": pl.Int64, "n_flagged": pl.Int64,
                                                         **{c: pl.Float64 for c in floats}},
                              infer_schema_length=None)
    store.save_table(exp, REPORT, "summary.parquet", summary_df)
    main = summary[0]
    return {"truth_known": has_truth, "flagged": int(main["n_flagged"]), "grid_method": first,
            "seconds": round(time.perf_counter() - t_all, 1),
            **{f"{s['method']}_{k}": s[k] for s in summary for k in ("n_flagged", *METRICS, "retrain_accuracy",
                                                                      "retrain_attack_success_rate")},
            "reference_accuracy": reference[0], "reference_attack_success_rate": reference[1],
            "failed_detectors": failed}


def plot_scores(scores: pl.DataFrame, dest, method: str | None = None) -> Path:
    """The first detector's score histogram (poisoned and clean apart where the truth is known, its
    lowest flagged score marked) and every detector's ROC curve against the truth, as one PNG."""
    from sklearn.metrics import roc_curve

    from ops.plots import figure, save

    methods = list(dict.fromkeys(scores["method"].to_list()))
    if method in methods:
        methods.remove(method)
        methods.insert(0, method)
    first = scores.filter(pl.col("method") == methods[0])
    known = scores["poisoned"].null_count() == 0 and 0 < scores["poisoned"].mean() < 1
    score = first["score"].to_numpy()
    fig, axes = figure((9, 3.3) if known else (4.6, 3.3), ncols=2 if known else 1)
    ax = axes[0] if known else axes
    if known:
        truth = first["poisoned"].to_numpy().astype(bool)
        ax.hist([score[~truth], score[truth]], bins=40, stacked=True,
                label=["clean", "poisoned"], color=["#8aa", "#d33"])
    else:
        ax.hist(score, bins=40, color="#8aa")
    flagged = score[first["flagged"].to_numpy().astype(bool)]
    if len(flagged):
        ax.axvline(flagged.min(), color="k", ls="--", lw=1, label=f"flagged ({len(flagged)})")
    ax.set_yscale("log")
    ax.set_xlabel(f"{methods[0]} score")
    ax.set_ylabel("training examples")
    ax.legend(fontsize=7)
    if known:
        ax = axes[1]
        for m in methods:
            g = scores.filter(pl.col("method") == m)
            fpr, tpr, _ = roc_curve(g["poisoned"].to_numpy().astype(bool), g["score"].to_numpy())
            ax.plot(fpr, tpr, label=m)
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7)
    return save(fig, dest)
