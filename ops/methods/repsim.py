"""Representation similarity: cosine of the penultimate features (``model.embed``) of a target and
a training example, under the model trained on all the data (the TRAK paper's baseline, trak.md §4)."""
import numpy as np
import torch

from kernels.npyio import NpyFile
from ops.methods import Context, Method, register


def _embed(model, x: torch.Tensor, batch: int = 1024) -> np.ndarray:
    with torch.no_grad():
        e = torch.cat([model.embed(x[i:i + batch]).flatten(1) for i in range(0, len(x), batch)])
    return torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy()


@register
class RepSim(Method):
    name = "repsim"
    asset = "baseline_attributions"
    description = "representation similarity: cosine of penultimate features of the full-data model"
    new_targets = True

    def fit(self, ctx: Context) -> dict:
        import json

        from ops.attribution import score_and_rank
        from ops.training import Data, load_member, model_factory

        store, exp = ctx.store, ctx.exp
        make_model, meta = model_factory(ctx.spec, store, exp)
        data = Data(store, exp, torch.device(ctx.device), norm=json.loads(meta["norm"]))
        model = make_model().to(ctx.device).eval()
        model.load_state_dict(load_member(ctx.spec, store, exp, int(meta["models"]) - 1))   # the full-data model
        train, test = _embed(model, data.x), _embed(model, data.xt)
        paths = {}
        for split, e in (("train", train), ("test", test)):
            with store.atomic(exp, self.asset, f"{self.name}/{split}_features.npy") as tmp:
                with NpyFile.create(tmp, (1, *e.shape), np.float32) as out:
                    out.write_rows(0, 0, e)
            paths[split] = store.require(exp, self.asset, f"{self.name}/{split}_features.npy")
        with NpyFile(paths["test"]) as targets:
            return score_and_rank(ctx, self, targets, paths["train"], np.ones(len(train)))

    def score_new(self, ctx: Context, new, out_path):
        import tempfile
        from pathlib import Path

        from kernels.trak import score_tiles

        e = _embed(new.full_model, new.x)
        with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmp:
            with NpyFile.create(Path(tmp) / "targets.npy", (1, *e.shape), np.float32) as t:
                t.write_rows(0, 0, e)
            with NpyFile(Path(tmp) / "targets.npy") as targets, \
                    NpyFile(ctx.store.require(ctx.exp, self.asset, f"{self.name}/train_features.npy")) as feats, \
                    NpyFile.create(out_path, (len(e), feats.shape[1]), np.float32) as out:
                score_tiles(targets, feats, np.ones(feats.shape[1], np.float32), out, ctx.device,
                            ctx.spec.trak.memory_gb * 2**30)
