"""The Smallify study (docs/studies.md): pruning during training (Leclerc, Vartak, Fernandez, Kraska,
Madden 2018) against statically sized networks, on the experiment's data.

For every λ in ``smallify.lambdas`` a network with switch layers (kernels/smallify.py) is trained
with the L1 penalty on its switches; units whose switch's sign keeps flipping are physically
removed during training.  For every fraction in ``smallify.width_grid`` the same architecture
without switches, its widths scaled, is trained with the same budget (epochs, batch size, learning
rate): the "traditional" networks.  Each finished network is folded to plain layers
(``kernels.smallify.fold``) and measured: parameters, test accuracy, CPU inference latency at batch
1 and 256 (``smallify.latency_threads`` threads, median of ``latency_repeats``).

The paper's claim ("35× smaller, 6× faster at similar accuracy") is checked against the most
accurate static network: a Smallify network counts when its accuracy is within
``smallify.tolerance`` of that network's; the table records how many times fewer parameters and how
much faster it is, and whether the smallest static network within the same tolerance is as small.
Nothing here knows Dagster (assets/smallify.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from ops.spec import Spec
from ops.store import ArtifactStore

RUNS = "smallify_runs"
Log = Callable[[str], None]

TABLES = {
    "smallify": """experiment VARCHAR, kind VARCHAR, lam DOUBLE, width_frac DOUBLE, seed INTEGER,
        widths VARCHAR, params BIGINT, test_accuracy DOUBLE, latency_b1_ms DOUBLE, latency_b256_ms DOUBLE,
        params_ratio DOUBLE, speedup_b256 DOUBLE, similar_accuracy BOOLEAN, seconds DOUBLE""",
    "smallify_history": """experiment VARCHAR, lam DOUBLE, seed INTEGER, step INTEGER, epoch INTEGER,
        loss DOUBLE, params BIGINT, widths VARCHAR""",
}


def _builders(spec: Spec, in_shape, classes: int):
    """(smallify network of given widths, static network of given widths) for the section's arch."""
    from kernels import smallify as K

    s = spec.smallify
    c, h = int(in_shape[0]), int(in_shape[1])
    if s.arch == "mlp":
        feats = int(np.prod(in_shape))
        return (lambda w: K.smallify_mlp(feats, w, classes)), (lambda w: K.static_mlp(feats, w, classes))
    n_conv = len(s.channels)
    return (lambda w: K.smallify_cnn(c, w[:n_conv], classes, h, hidden=w[n_conv:])), \
        (lambda w: K.static_cnn(c, w[:n_conv], classes, h, hidden=w[n_conv:]))


def _widths(spec: Spec) -> list[int]:
    s = spec.smallify
    return list(s.hidden) if s.arch == "mlp" else [*s.channels, *s.hidden]


def _measure(model, data, in_shape, s) -> dict:
    from kernels import smallify as K

    threads = torch.get_num_threads()
    torch.set_num_threads(s.latency_threads)
    try:
        folded = K.fold(model).cpu()
        lat = {b: K.latency(folded, in_shape, batch=b, repeats=s.latency_repeats) for b in (1, 256)}
    finally:
        torch.set_num_threads(threads)
    return {"params": K.count_params(folded), "test_accuracy": K.accuracy(model, data.xt, data.yt),
            "latency_b1_ms": lat[1] * 1e3, "latency_b256_ms": lat[256] * 1e3}


def smallify_runs(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from kernels import smallify as K
    from ops.training import Data, model_seed

    s = spec.smallify
    data = Data(store, exp, torch.device(device))
    classes = len(store.load_json(exp, "training_set", "meta.json")["classes"])
    in_shape = tuple(data.in_shape)
    make_small, make_static = _builders(spec, in_shape, classes)
    full = _widths(spec)
    train = dict(epochs=s.epochs or spec.training.epochs, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum,
                 weight_decay=s.weight_decay, prune_every=s.prune_every, threshold=s.threshold)
    rows, hist = [], []
    for seed_i in range(s.seeds):
        seed = model_seed(spec, 800_000 + seed_i)
        for frac in s.width_grid:
            w = [max(1, int(round(v * frac))) for v in full]
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model, _ = K.train_smallify(make_static(w).to(device), (data.x, data.y), lam=0.0, seed=seed, **train)
            m = _measure(model, data, in_shape, s)
            rows.append({"kind": "static", "lam": 0.0, "width_frac": float(frac), "seed": seed_i,
                         "widths": ",".join(map(str, K.widths(model) or w)), **m,
                         "seconds": time.perf_counter() - t0})
            log(f"static ×{frac:g} {w}: {m['params']} params, accuracy {m['test_accuracy']:.4f}, "
                f"{m['latency_b256_ms']:.3f} ms at batch 256")
        for lam in s.lambdas:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model, history = K.train_smallify(
                make_small(full).to(device), (data.x, data.y), lam=float(lam), seed=seed,
                progress=lambda e, loss, ws, lam=lam: log(f"λ {lam:g}: epoch {e + 1} loss {loss:.4f} widths {ws}"),
                **train)
            m = _measure(model, data, in_shape, s)
            kept = K.widths(model)
            rows.append({"kind": "smallify", "lam": float(lam), "width_frac": float(sum(kept) / sum(full)),
                         "seed": seed_i, "widths": ",".join(map(str, kept)), **m,
                         "seconds": time.perf_counter() - t0})
            hist += [{"lam": float(lam), "seed": seed_i, "step": h["step"], "epoch": h["epoch"], "loss": h["loss"],
                      "params": h["params"], "widths": ",".join(map(str, h["widths"]))} for h in history]
            log(f"smallify λ {lam:g}: kept {kept} of {full}, {m['params']} params, accuracy "
                f"{m['test_accuracy']:.4f}, {m['latency_b256_ms']:.3f} ms at batch 256")
    table = compare(pl.DataFrame(rows), s.tolerance).select(pl.lit(exp).alias("experiment"), pl.all())
    history = pl.DataFrame(hist, schema={"lam": pl.Float64, "seed": pl.Int64, "step": pl.Int64, "epoch": pl.Int64,
                                         "loss": pl.Float64, "params": pl.Int64, "widths": pl.String})
    history = history.select(pl.lit(exp).alias("experiment"), pl.all())
    store.save_table(exp, RUNS, "smallify.parquet", table)
    store.save_table(exp, RUNS, "smallify_history.parquet", history)
    claim = check_claim(table, s.tolerance)
    store.save_json(exp, RUNS, "claim.json", claim)
    plot_size_accuracy(table, store.path(exp, RUNS, "accuracy_vs_size.png"))
    return {"arch": s.arch, "full_widths": full, "seeds": s.seeds, "epochs": train["epochs"], "claim": claim,
            "rows": len(table)}


def compare(table: pl.DataFrame, tolerance: float) -> pl.DataFrame:
    """Per seed, each network against that seed's most accurate static network: how many times
    fewer parameters, how much faster at batch 256, and whether its accuracy is within
    ``tolerance`` of it."""
    best = (table.filter(pl.col("kind") == "static").sort("test_accuracy", descending=True)
            .group_by("seed", maintain_order=True).first()
            .select("seed", ref_params="params", ref_acc="test_accuracy", ref_lat="latency_b256_ms"))
    return (table.join(best, on="seed", how="left")
            .with_columns(params_ratio=pl.col("ref_params") / pl.col("params"),
                          speedup_b256=pl.col("ref_lat") / pl.col("latency_b256_ms"),
                          similar_accuracy=pl.col("test_accuracy") >= pl.col("ref_acc") - tolerance)
            .drop("ref_params", "ref_acc", "ref_lat"))


def check_claim(table: pl.DataFrame, tolerance: float) -> dict:
    """The paper's "35× smaller, 6× faster at similar accuracy": the smallest Smallify network within
    ``tolerance`` of the most accurate static one (means over seeds), against it and against the
    smallest static network within the same tolerance (what a width search alone finds)."""
    def means(kind, key):
        return (table.filter(pl.col("kind") == kind).group_by(key, maintain_order=True)
                .agg(pl.col("params").mean(), pl.col("test_accuracy").mean(), pl.col("params_ratio").mean(),
                     pl.col("speedup_b256").mean(), pl.col("similar_accuracy").all(), pl.col("widths").first()))

    small, static = means("smallify", "lam"), means("static", "width_frac")
    out = {"paper": {"params_ratio": 35.0, "speedup": 6.0}, "tolerance": tolerance}
    ok = small.filter(pl.col("similar_accuracy")).sort("params")
    if not len(ok):
        out.update(held=False, why=f"no Smallify network came within {tolerance} of the best static network's accuracy")
        return out
    best = ok.row(0, named=True)
    out["smallify"] = {"lam": best["lam"], "widths": best["widths"], "params": best["params"],
                       "test_accuracy": best["test_accuracy"], "params_ratio": best["params_ratio"],
                       "speedup_b256": best["speedup_b256"]}
    sok = static.filter(pl.col("similar_accuracy")).sort("params")
    if len(sok):
        s0 = sok.row(0, named=True)
        out["smallest_similar_static"] = {"width_frac": s0["width_frac"], "widths": s0["widths"],
                                          "params": s0["params"], "test_accuracy": s0["test_accuracy"],
                                          "params_ratio": s0["params_ratio"], "speedup_b256": s0["speedup_b256"]}
        out["smaller_than_width_search"] = bool(best["params"] < s0["params"])
    out["held"] = bool(best["params_ratio"] >= 35.0 and best["speedup_b256"] >= 6.0)
    return out


def plot_size_accuracy(table: pl.DataFrame, dest) -> Path:
    """Test accuracy against parameters: Smallify's λ sweep and the static width grid."""
    from ops.plots import figure, save

    fig, ax = figure((5.4, 3.6))
    st = table.filter(pl.col("kind") == "static").group_by("width_frac").agg(
        pl.col("params").mean(), pl.col("test_accuracy").mean()).sort("params")
    ax.plot(st["params"].to_numpy(), st["test_accuracy"].to_numpy(), marker="s", color="gray",
            label="static width grid")
    sm = table.filter(pl.col("kind") == "smallify").group_by("lam").agg(
        pl.col("params").mean(), pl.col("test_accuracy").mean()).sort("params")
    ax.plot(sm["params"].to_numpy(), sm["test_accuracy"].to_numpy(), marker="o", ls="", color="C3",
            label="Smallify")
    for row in sm.iter_rows(named=True):
        ax.annotate(f"λ={row['lam']:g}", (row["params"], row["test_accuracy"]), fontsize=6,
                    xytext=(3, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (folded)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, dest)
