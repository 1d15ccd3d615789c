"""TRAK (ops/attribution.py: gradient_features, attribution_scores): scores are stored by the
attribution_scores asset; new targets are scored by ops.attribution.score_targets."""
from ops.methods import Context, Method, register


@register
class Trak(Method):
    name = "trak"
    asset = "attribution_scores"
    description = "TRAK: projected margin gradients, ensemble of checkpoints (shared/reference/trak.md)"

    def scores_path(self, ctx: Context):
        return ctx.store.require(ctx.exp, self.asset, "test_x_train.npy")

    def top_table(self, ctx: Context):
        return ctx.store.require(ctx.exp, self.asset, "top_attributions.parquet")
