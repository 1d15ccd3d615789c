"""Train the models of an experiment (one per subset mask, plus one on all data) and record
their outputs.  Models train in lockstep groups (kernels/train.py) reading the loader files."""
from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kernels.dataloader import Loader
from kernels.models import build_model, margin
from kernels.transforms import Normalize, Pipeline
from kernels.train import Recipe, predict_stacked, train_stacked
from ops.data import MASKS, open_loader
from ops.spec import Spec
from ops.store import ArtifactError, ArtifactStore

CKPT = "checkpoints"
Log = Callable[[str], None]


def recipe_of(spec: Spec) -> Recipe:
    t = spec.training.model_dump(exclude={"models_per_batch"})
    t["step_milestones"] = tuple(t["step_milestones"])
    return Recipe(**t)


def recipe_hash(spec: Spec) -> str:
    body = {"model": spec.model.model_dump(), "training": spec.training.model_dump(exclude={"models_per_batch"})}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def model_seed(spec: Spec, model_id: int) -> int:
    return (spec.seed * 1_000_003 + model_id * 7919 + 1) % (2**31 - 1)


class Data:
    """The three loader files, read through the Loader in resident mode: each split is normalized
    once on the compute device and training steps index it there (no per-step host copies)."""

    def __init__(self, store: ArtifactStore, exp: str, device: torch.device, norm: dict | None = None):
        files = {s: open_loader(store, exp, s) for s in ("train", "test", "triggered")}
        if norm is None:
            train_u8 = files["train"].array("image")
            px = np.asarray(train_u8, np.float64).reshape(-1, train_u8.shape[-1]) / 255.0
            norm = {"mean": px.mean(0).tolist(), "std": np.maximum(px.std(0), 1e-3).tolist()}
        self.norm = norm
        pipe = Pipeline([Normalize(tuple(norm["mean"]), tuple(norm["std"]))])

        def load(split):
            f = files[split]
            if not len(f):
                return None, None
            loader = Loader(f, batch_size=len(f), order="sequential", pipelines={"image": pipe},
                            fields=("image", "label"), resident=True, device=device)
            batch = loader.fetch(np.arange(len(f)))
            return batch["image"], batch["label"]

        self.x, self.y = load("train")
        self.xt, self.yt = load("test")
        self.xg, self.yg = load("triggered")
        self.in_shape = tuple(self.x.shape[1:])


def make_model_fn(spec: Spec, in_shape, num_classes):
    return partial(build_model, spec.model.arch, tuple(in_shape), int(num_classes), spec.model.hidden)


def evaluate(make_model, params, data: Data, target_class: int | None, tta_flip: bool = False) -> dict:
    logits = predict_stacked(make_model, params, data.xt, tta_flip=tta_flip)
    out = {"accuracy": (logits.argmax(-1) == data.yt).float().mean(1).cpu().numpy(),
           "margins_test": margin(logits, data.yt.expand(logits.shape[0], -1)).cpu().numpy()}
    lt = predict_stacked(make_model, params, data.x)
    out["margins_train"] = margin(lt, data.y.expand(lt.shape[0], -1)).cpu().numpy()
    if data.xg is not None and target_class is not None:
        lg = predict_stacked(make_model, params, data.xg, tta_flip=tta_flip)
        out["asr"] = (lg.argmax(-1) == target_class).float().mean(1).cpu().numpy()
    else:
        out["asr"] = np.full(logits.shape[0], np.nan)
    return out


def num_classes_of(store: ArtifactStore, exp: str) -> int:
    return len(store.load_json(exp, "training_set", "meta.json")["classes"])


def checkpoints(spec: Spec, store: ArtifactStore, exp: str, device: torch.device, log: Log) -> dict:
    data = Data(store, exp, device)
    n_cls = num_classes_of(store, exp)
    target = store.load_json(exp, "training_set", "meta.json")["target_class"]
    make_model = make_model_fn(spec, data.in_shape, n_cls)
    masks = np.asarray(store.load_npy(exp, MASKS, "masks.npy"))
    n = masks.shape[1]
    if n != len(data.y):
        raise ArtifactError(f"subset masks cover {n} examples but the train loader file has {len(data.y)}: "
                            f"re-materialize subset_masks")
    m_all = len(masks)
    # jobs: every mask row, then one model on all data
    subsets = [np.flatnonzero(r) for r in masks] + [np.arange(n)]
    ids = list(range(m_all + 1))
    per = spec.training.models_per_batch
    results: dict[str, list] = {}
    stacked: dict[str, list] = {}
    t0 = time.perf_counter()
    groups = [ids[i:min(i + per, m_all)] for i in range(0, m_all, per)] + [[m_all]]
    for gi, group in enumerate(groups):
        params = train_stacked(make_model, data.x, data.y, [subsets[i] for i in group],
                               [model_seed(spec, i) for i in group], recipe_of(spec))
        ev = evaluate(make_model, params, data, target, spec.training.tta_flip)
        for k, v in ev.items():
            results.setdefault(k, []).append(v)
        for k, v in params.items():
            stacked.setdefault(k, []).append(v)
        done = group[-1] + 1
        log(f"trained {done}/{m_all + 1} models ({time.perf_counter() - t0:.1f}s), "
            f"mean test accuracy of this group {ev['accuracy'].mean():.3f}")
    res = {k: np.concatenate(v) for k, v in results.items()}
    params = {k: torch.cat(v) for k, v in stacked.items()}
    meta = {"arch": spec.model.arch, "hidden": spec.model.hidden, "in_shape": json.dumps(list(data.in_shape)),
            "num_classes": n_cls, "recipe_hash": recipe_hash(spec), "models": m_all + 1,
            "norm": json.dumps(data.norm), "experiment": exp}
    store.save_tensors(exp, CKPT, "models.safetensors", params, meta)
    store.save_npy(exp, "model_outputs", "margins_test.npy", res["margins_test"].astype(np.float32))
    store.save_npy(exp, "model_outputs", "margins_train.npy", res["margins_train"].astype(np.float32))
    roles = ["train"] * spec.subsets.num_models + ["heldout"] * spec.subsets.num_heldout + ["full"]
    table = pd.DataFrame({
        "experiment": exp, "model_id": ids, "role": roles,
        "mask_index": pd.array(list(range(m_all)) + [None], dtype="Int64"),
        "seed": [model_seed(spec, i) for i in ids],
        "n_train_examples": [len(s) for s in subsets], "accuracy": res["accuracy"],
        "attack_success_rate": res["asr"], "recipe_hash": recipe_hash(spec)})
    store.save_table(exp, CKPT, "models.parquet", table)
    subset_acc = res["accuracy"][:m_all]
    return {"models": m_all + 1, "seconds": round(time.perf_counter() - t0, 1),
            "mean_subset_accuracy": float(subset_acc.mean()), "min_subset_accuracy": float(subset_acc.min()),
            "full_accuracy": float(res["accuracy"][-1]), "full_attack_success": float(res["asr"][-1]),
            "chance": 1.0 / n_cls}


def load_models(spec: Spec, store: ArtifactStore, exp: str):
    """(make_model, stacked params, metadata); refuses checkpoints of another architecture."""
    params, meta = store.load_tensors(exp, CKPT, "models.safetensors")
    if meta.get("arch") != spec.model.arch or int(meta.get("hidden", -1)) != spec.model.hidden:
        raise ArtifactError(f"{store.path(exp, CKPT, 'models.safetensors')} holds {meta.get('arch')} "
                            f"(hidden={meta.get('hidden')}) models but the spec asks for {spec.model.arch} "
                            f"(hidden={spec.model.hidden}): re-materialize checkpoints")
    make_model = make_model_fn(spec, json.loads(meta["in_shape"]), int(meta["num_classes"]))
    expected = {k: tuple(v.shape) for k, v in make_model().state_dict().items()}
    got = {k: tuple(v.shape[1:]) for k, v in params.items()}
    if expected != got:
        raise ArtifactError(f"checkpoint parameters {got} do not match the model {expected}")
    return make_model, params, meta
