"""TracIn-CP (Pruthi et al. 2020) on TRAK's projected gradients: the dot product of a target's
margin gradient and a training example's loss-reducing gradient, summed over the saved
checkpoints (every member of the TRAK ensemble: each model's final and ``trak.checkpoint_epochs``
checkpoints).  With TRAK's margin f, the cross-entropy loss is log(1 + e^{-f}), so
-∇ℓ(x_i) = Q_i ∇f(x_i): the training side is Q_m ⊙ Φ_m.  Learning rates (constant per checkpoint
here) only scale the score.  No inverse: this is the "gradient dot product" baseline of the TRAK
paper (trak.md §4)."""
import numpy as np

from kernels.npyio import NpyFile
from ops.methods import Context, Method, register


@register
class TracIn(Method):
    name = "tracin"
    asset = "baseline_attributions"
    description = "TracIn-CP: projected gradient dot products summed over checkpoints"
    new_targets = True      # a new target's side is its TRAK features: the same projections

    def fit(self, ctx: Context) -> dict:
        from ops.attribution import FEAT, score_and_rank

        store, exp = ctx.store, ctx.exp
        with NpyFile(store.require(exp, FEAT, "train.npy")) as train, \
                NpyFile(store.require(exp, FEAT, "out_to_loss.npy")) as qf:
            m, n, k = train.shape
            with store.atomic(exp, self.asset, f"{self.name}/train_features.npy") as tmp:
                with NpyFile.create(tmp, (m, n, k), np.float32) as out:
                    for i in range(m):
                        q = qf.read(i, i + 1)[0]
                        for r in range(0, n, 8192):
                            out.write_rows(i, r, train.rows(i, r, r + 8192) * q[r:r + 8192, None])
        with NpyFile(store.require(exp, FEAT, "test.npy")) as test:
            return score_and_rank(ctx, self, test, store.require(exp, self.asset, f"{self.name}/train_features.npy"),
                                  np.ones(n) * m)

    def score_new(self, ctx: Context, new, out_path):
        from kernels.trak import score_tiles

        with NpyFile(new.features) as targets, \
                NpyFile(ctx.store.require(ctx.exp, self.asset, f"{self.name}/train_features.npy")) as feats:
            m, n, _ = feats.shape
            with NpyFile.create(out_path, (targets.shape[1], n), np.float32) as out:
                score_tiles(targets, feats, np.full(n, m, np.float32), out, ctx.device, ctx.spec.trak.memory_gb * 2**30)
