"""Datamodels (ops/attribution.py: datamodel_weights): one LASSO per target; no new targets
without new margins from every subset model."""
import numpy as np

from ops.methods import Context, Method, register


@register
class Datamodels(Method):
    name = "datamodels"
    asset = "datamodel_weights"
    description = "datamodels: LASSO from subset masks to each target's margin (shared/reference/datamodels.md)"

    def scores_path(self, ctx: Context):
        raise NotImplementedError("datamodels keeps its weights as weight.npy (train x targets)")

    def top_table(self, ctx: Context):
        return ctx.store.require(ctx.exp, self.asset, "top_attributions.parquet")

    def predict(self, ctx: Context, masks: np.ndarray) -> np.ndarray:
        w = np.asarray(ctx.store.load_npy(ctx.exp, self.asset, "weight.npy"), np.float64)
        b = np.asarray(ctx.store.load_npy(ctx.exp, self.asset, "bias.npy"), np.float64)
        return masks @ w + b
