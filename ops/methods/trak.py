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

    new_targets = True

    def score_new(self, ctx: Context, new, out_path):
        from kernels.npyio import NpyFile
        from ops.attribution import score_targets

        with NpyFile(new.features) as feats:
            score_targets(ctx.spec, ctx.store, ctx.exp, feats, out_path, ctx.device, ctx.log)

    def top_table(self, ctx: Context):
        return ctx.store.require(ctx.exp, self.asset, "top_attributions.parquet")
