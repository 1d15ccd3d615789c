"""The 3DB study (docs/studies.md; Leclerc et al. 2021): debug a model by rendering objects under
controlled variations and finding where it fails.  The search layer (controls, policies, the
evaluator, the config) is ops/threedb.py, the renderer kernels/render.py; this module is the study's
stages over the store.  Nothing here knows Dagster (assets/threedb.py).

- ``threedb_model``: the model under test.  ``model: rendered`` trains ``arch`` on
  ``train_images`` rendered objects (random poses, light, zoom, muted backgrounds) through the
  training engine and stores it (reused while its settings are unchanged); ``model:
  torchvision.<name>`` loads the user's weights from disk.  Held-out accuracy on fresh renders of
  the training distribution is recorded, so a collapse under a control reads against it.
- ``plan_renders`` / ``render_chunk`` / ``collect_renders``: the config's jobs (objects x policy
  points) in chunks, each chunk rendered and predicted on its own (the assets fan them out as
  dynamic ops), then collected into one results table with every parameter, accuracy heatmaps over
  pairs of controls and per-parameter accuracy, and which controls make accuracy collapse.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from torch import nn

from ops.spec import Spec
from ops.store import ArtifactStore

MODEL, RESULTS = "threedb_model", "threedb_results"
Log = Callable[[str], None]

TABLES = {
    "threedb_results": """experiment VARCHAR, job INTEGER, object VARCHAR, label INTEGER, prediction INTEGER,
        predicted_class VARCHAR, is_correct BOOLEAN, loss DOUBLE, params VARCHAR""",
    "threedb_parameters": "experiment VARCHAR, job INTEGER, param VARCHAR, value DOUBLE, choice VARCHAR",
    "threedb_heatmaps": """experiment VARCHAR, x_param VARCHAR, y_param VARCHAR, x_value DOUBLE, y_value DOUBLE,
        accuracy DOUBLE, renders INTEGER""",
}


def experiment_of(spec: Spec):
    from ops.threedb import Experiment

    c = spec.threedb.config
    return Experiment.from_file(c) if isinstance(c, str) else Experiment.from_dict(c, "threedb.config")


def _model_key(spec: Spec, exp3) -> str:
    t = spec.threedb
    body = {"seed": spec.seed, "model": t.model, "weights": t.weights, "arch": t.arch, "hidden": t.hidden,
            "train_images": t.train_images, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
            "size": exp3.size, "classes": exp3.classes}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Normalized(nn.Module):
    """The model under test as 3DB calls it: images in [0, 1], normalized inside."""

    def __init__(self, net: nn.Module, mean, std, outputs: list[int] | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.outputs = outputs

    def forward(self, x):
        out = self.net((x - self.mean) / self.std)
        return out[:, self.outputs] if self.outputs is not None else out


def threedb_model(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from dataclasses import replace

    from kernels.models import build_model
    from kernels.render import Renderer
    from kernels.train import Recipe, train_stacked
    from ops.threedb import render_training_set
    from ops.training import model_seed

    t = spec.threedb
    exp3 = experiment_of(spec)
    key = _model_key(spec, exp3)
    if store.path(exp, MODEL, "model.json").exists():
        stored = store.load_json(exp, MODEL, "model.json")
        if stored.get("key") == key and (t.model != "rendered" or store.path(exp, MODEL, "model.safetensors").exists()):
            log(f"model reused (same settings, key {key})")
            return {"reused": True, **stored["summary"]}
    t0 = time.perf_counter()
    if t.model != "rendered":
        summary = {"model": t.model, "weights": t.weights, "classes": exp3.classes}
        load_model(spec, store, exp, device)         # loads now: a bad name or file fails here, naming it
        store.save_json(exp, MODEL, "model.json", {"key": key, "summary": summary})
        return {"reused": False, **summary}
    objects = exp3.classes
    with Renderer(exp3.size) as r:      # the 3D stage in its render server process
        x_img, y = render_training_set(t.train_images, seed=spec.seed, size=exp3.size, objects=objects, renderer=r)
        xh_img, yh = render_training_set(max(len(objects) * 50, t.train_images // 5), seed=spec.seed + 10_007,
                                         size=exp3.size, objects=objects, renderer=r)
    log(f"rendered {len(y)} training and {len(yh)} held-out images at {exp3.size} px "
        f"({time.perf_counter() - t0:.1f}s)")
    px = x_img.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = px.mean(0).tolist(), np.maximum(px.std(0), 1e-3).tolist()
    dev = torch.device(device)

    def prep(img):
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float().div(255.0)
        return ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).to(dev)

    x, xh = prep(x_img), prep(xh_img)
    in_shape = (3, exp3.size, exp3.size)
    make = lambda: build_model(t.arch, in_shape, len(objects), t.hidden)   # noqa: E731
    recipe = replace(Recipe(), epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, flip=True, translate=2)
    seed = model_seed(spec, 600_000)
    params = train_stacked(make, x, torch.from_numpy(y).to(dev), [np.arange(len(y))], [seed], recipe,
                           on_epoch=lambda e, loss: log(f"classifier epoch {e + 1}/{t.epochs} loss {loss:.4f}"))
    net = make().to(dev)
    net.load_state_dict({k: v[0].to(dev) for k, v in params.items()})
    net.eval()
    with torch.no_grad():
        acc_train = float((net(x).argmax(1).cpu().numpy() == y).mean())
        acc_held = float((net(xh).argmax(1).cpu().numpy() == yh).mean())
    summary = {"model": "rendered", "arch": t.arch, "hidden": t.hidden, "classes": objects,
               "train_images": int(len(y)), "train_accuracy": round(acc_train, 4),
               "heldout_accuracy": round(acc_held, 4), "chance": round(1 / len(objects), 4),
               "seconds": round(time.perf_counter() - t0, 1), "norm": {"mean": mean, "std": std}}
    store.save_tensors(exp, MODEL, "model.safetensors", {k: v[0].contiguous() for k, v in params.items()},
                       {"key": key, "arch": t.arch})
    store.save_json(exp, MODEL, "model.json", {"key": key, "summary": summary})
    log(f"classifier: train accuracy {acc_train:.3f}, held-out renders {acc_held:.3f} (chance {1 / len(objects):.3f})")
    return {"reused": False, **summary}


def load_model(spec: Spec, store: ArtifactStore, exp: str, device) -> nn.Module:
    """The model under test, taking images in [0, 1] and giving logits over the config's classes."""
    from safetensors.torch import load_file

    from kernels.models import build_model

    t = spec.threedb
    exp3 = experiment_of(spec)
    in_shape = (3, exp3.size, exp3.size)
    if t.model == "rendered":
        tensors, _ = store.load_tensors(exp, MODEL, "model.safetensors")
        summary = store.load_json(exp, MODEL, "model.json")["summary"]
        net = build_model(t.arch, in_shape, len(exp3.classes), t.hidden)
        net.load_state_dict(tensors)
        norm = summary["norm"]
        model = Normalized(net, norm["mean"], norm["std"])
    else:
        import torchvision

        name = t.model.split(".", 1)[1]
        try:
            net = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise ValueError(f"threedb.model: {e}") from None
        path = Path(t.weights)
        if not path.is_file():
            raise FileNotFoundError(f"threedb.weights: {path} does not exist")
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                       weights_only=True)
        net.load_state_dict(state)
        outputs = None
        if t.label_map:
            missing = [c for c in exp3.classes if c not in t.label_map]
            if missing:
                raise ValueError(f"threedb.label_map: no output index for {missing}")
            outputs = [int(t.label_map[c]) for c in exp3.classes]
        model = Normalized(net, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], outputs)   # torchvision's
    return model.to(device).eval()


def plan_renders(spec: Spec, store: ArtifactStore, exp: str) -> list[list[int]]:
    """The config's job ids in chunks of ``threedb.chunk``; earlier chunk files are cleared."""
    import shutil

    exp3 = experiment_of(spec)
    shutil.rmtree(store.path(exp, RESULTS, "chunks"), ignore_errors=True)
    ids = list(range(exp3.count()))
    return [ids[i:i + spec.threedb.chunk] for i in range(0, len(ids), spec.threedb.chunk)]


def render_chunk(spec: Spec, store: ArtifactStore, exp: str, ids: list[int], device, name: str,
                 log: Log = lambda _: None) -> str:
    """Render and predict one chunk of jobs; its records go to ``chunks/<name>.parquet``."""
    exp3 = experiment_of(spec)
    wanted = set(ids)
    jobs = [j for j in exp3.jobs() if j.id in wanted]
    model = load_model(spec, store, exp, device)
    t0 = time.perf_counter()
    with exp3.renderer() as r:
        _, records = exp3.run(jobs, model, r, device=device)
    rows = [{"job": rec["job"], "object": rec["object"], "label": rec["label"],
             "prediction": int(rec["prediction"]), "is_correct": bool(rec["is_correct"]), "loss": float(rec["loss"]),
             "params": json.dumps({k: v for k, v in rec.items() if "." in k}, sort_keys=True, default=float)}
            for rec in records]
    store.save_table(exp, RESULTS, f"chunks/{name}.parquet", pl.DataFrame(rows))
    log(f"{name}: {len(jobs)} renders in {time.perf_counter() - t0:.1f}s, accuracy "
        f"{np.mean([r['is_correct'] for r in rows]):.3f}")
    return name


def _bins(values: np.ndarray, max_bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(bin index per value, bin centre): the distinct values of a grid, or equal-width bins."""
    uniq = np.unique(values)
    if len(uniq) <= 16:
        return np.searchsorted(uniq, values), uniq
    edges = np.linspace(values.min(), values.max(), max_bins + 1)
    idx = np.clip(np.digitize(values, edges[1:-1]), 0, max_bins - 1)
    return idx, (edges[:-1] + edges[1:]) / 2


def collect_renders(spec: Spec, store: ArtifactStore, exp: str, names: list[str], log: Log = lambda _: None) -> dict:
    exp3 = experiment_of(spec)
    table = pl.concat([store.load_table(exp, RESULTS, f"chunks/{n}.parquet") for n in names]).sort("job")
    if len(table) != exp3.count():
        raise RuntimeError(f"threedb: {len(table)} of {exp3.count()} renders collected")
    table = table.with_columns(predicted_class=pl.col("prediction").map_elements(
        lambda i: exp3.classes[i] if 0 <= i < len(exp3.classes) else str(i), return_dtype=pl.String))
    params = [json.loads(p) for p in table["params"].to_list()]
    long = []
    for job, p in zip(table["job"].to_list(), params):
        for k, v in p.items():
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            long.append((job, k, float(v) if num else None, None if num else str(v)))
    long = pl.DataFrame(long, schema={"job": pl.Int64, "param": pl.String, "value": pl.Float64,
                                      "choice": pl.String}, orient="row")
    correct = table["is_correct"].to_numpy().astype(float)
    searched = [n for n in exp3.space.names if n in (params[0] if params else {})
                and len({p[n] for p in params}) > 1]
    numeric = [n for n in searched if isinstance(params[0][n], (int, float)) and not isinstance(params[0][n], bool)]
    # accuracy per value of each searched parameter, and where it collapses
    per_param, collapses = {}, []
    for n in searched:
        vals = np.array([p[n] for p in params], dtype=float if n in numeric else object)
        if n in numeric:
            idx, centres = _bins(vals)
            keys = [float(c) for c in centres]
        else:
            keys = sorted(set(vals.tolist()))
            idx = np.array([keys.index(v) for v in vals])
        accs = [float(correct[idx == i].mean()) if (idx == i).any() else None for i in range(len(keys))]
        per_param[n] = {str(round(k, 4) if isinstance(k, float) else k): a for k, a in zip(keys, accs)}
        good = [a for a in accs if a is not None]
        if good and max(good) >= 0.5 and min(good) <= 0.5 * max(good):
            worst = int(np.nanargmin([np.nan if a is None else a for a in accs]))
            collapses.append({"param": n, "best": round(max(good), 3), "worst": round(min(good), 3),
                              "at": keys[worst] if not isinstance(keys[worst], float) else round(keys[worst], 4)})
    pairs = spec.threedb.heatmaps or [(a, b) for i, a in enumerate(numeric[:6]) for b in numeric[i + 1:6]]
    heat_rows, plots = [], []
    for a, b in pairs:
        if a not in numeric or b not in numeric:
            raise ValueError(f"threedb.heatmaps: {a} x {b}: both must be searched continuous parameters "
                             f"(searched: {numeric})")
        ia, ca = _bins(np.array([p[a] for p in params], float))
        ib, cb = _bins(np.array([p[b] for p in params], float))
        grid = np.full((len(cb), len(ca)), np.nan)
        for i in range(len(ca)):
            for j in range(len(cb)):
                m = (ia == i) & (ib == j)
                if m.any():
                    grid[j, i] = correct[m].mean()
                    heat_rows.append((a, b, float(ca[i]), float(cb[j]), float(grid[j, i]), int(m.sum())))
        name = f"heatmap_{a}_{b}.png".replace("/", "_")
        plots.append(plot_heatmap(grid, ca, cb, a, b, store.path(exp, RESULTS, name)))
    heat = pl.DataFrame(heat_rows, schema={"x_param": pl.String, "y_param": pl.String, "x_value": pl.Float64,
                                           "y_value": pl.Float64, "accuracy": pl.Float64, "renders": pl.Int64},
                        orient="row")
    lit = pl.lit(exp).alias("experiment")
    store.save_table(exp, RESULTS, "threedb_results.parquet",
                     table.select(lit, "job", "object", "label", "prediction", "predicted_class", "is_correct", "loss",
                                  "params"))
    store.save_table(exp, RESULTS, "threedb_parameters.parquet", long.select(lit, pl.all()))
    store.save_table(exp, RESULTS, "threedb_heatmaps.parquet", heat.select(lit, pl.all()))
    summary = {"renders": len(table), "accuracy": round(float(correct.mean()), 4),
               "accuracy_by_object": {o: round(float(g["is_correct"].mean()), 4)
                                      for (o,), g in table.group_by("object", maintain_order=True)},
               "accuracy_by_param": per_param, "collapses": collapses, "heatmaps": [list(p) for p in pairs]}
    store.save_json(exp, RESULTS, "summary.json", summary)
    log(f"{len(table)} renders, accuracy {correct.mean():.3f}; collapses: "
        + (", ".join(f"{c['param']} (down to {c['worst']} at {c['at']})" for c in collapses) or "none"))
    return {**summary, "plots": [str(p) for p in plots]}


def plot_heatmap(grid: np.ndarray, xs, ys, xname: str, yname: str, dest) -> Path:
    """Accuracy over a pair of controls as an image (3DB's heatmaps)."""
    from ops.plots import figure, save

    fig, ax = figure((4.2, 3.5))
    im = ax.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{v:.2g}" for v in xs], fontsize=6, rotation=45)
    ax.set_yticks(range(len(ys)), [f"{v:.2g}" for v in ys], fontsize=6)
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)
    fig.colorbar(im, ax=ax, label="accuracy")
    return save(fig, dest)
