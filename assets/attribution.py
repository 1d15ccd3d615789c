"""Attribution: TRAK features and scores, datamodels, and their LDS."""

import numpy as np
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext,
                     MaterializeResult, MetadataValue, asset)

from assets.common import code_version, experiments_partitions, metadata
from assets.common import png as png_md
from assets.sources import source_deps
from ops.tables import markdown
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "attribution"


@asset(deps=["checkpoints", *source_deps("spec/trak")], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch", "numpy"},
       check_specs=[AssetCheckSpec("features_finite", asset="gradient_features", blocking=True,
                                   description="Projected gradients and Q hold no NaN or inf.")],
       code_version=CODE_VERSION)
def gradient_features(context: AssetExecutionContext, experiments: ExperimentsResource,
                      store: ArtifactStoreResource, compute: ComputeResource):
    """TRAK features: per-example margin gradients, randomly projected to k dims, per checkpoint."""
    from ops import attribution

    key = context.partition_key
    summary = attribution.gradient_features(experiments.load(key), store.get(), key, compute.torch_device(),
                                            context.log.info)
    yield MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, attribution.FEAT)}))
    yield AssetCheckResult(check_name="features_finite", passed=summary["finite"], severity=AssetCheckSeverity.ERROR)


@asset(deps=["gradient_features"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"numpy"},
       check_specs=[AssetCheckSpec("scores_finite", asset="attribution_scores", blocking=True,
                                   description="TRAK score matrices hold no NaN or inf.")],
       code_version=CODE_VERSION)
def attribution_scores(context: AssetExecutionContext, experiments: ExperimentsResource,
                       store: ArtifactStoreResource, compute: ComputeResource):
    """TRAK scores: targets x train and train x train, an ensemble over checkpoints, computed tile by
    tile on the compute device; with the finalized training features new targets are scored against."""
    from ops import attribution

    key = context.partition_key
    summary = attribution.attribution_scores(experiments.load(key), store.get(), key, context.log.info,
                                             compute.torch_device())
    yield MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, attribution.SCORES)}))
    yield AssetCheckResult(check_name="scores_finite", passed=summary["finite"], severity=AssetCheckSeverity.ERROR)


@asset(deps=["model_outputs", "subset_masks", *source_deps("spec/datamodels")], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"}, code_version=CODE_VERSION)
def datamodel_weights(context: AssetExecutionContext, experiments: ExperimentsResource,
                      store: ArtifactStoreResource, compute: ComputeResource) -> MaterializeResult:
    """One sparse linear model per target (LASSO from masks to margins), lambda chosen on held-out models."""
    from ops import attribution

    key = context.partition_key
    summary = attribution.datamodel_weights(experiments.load(key), store.get(), key, context.log.info,
                                            compute.torch_device())
    return MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, attribution.DM)}))


@asset(deps=["gradient_features", "checkpoints"], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"},
       check_specs=[AssetCheckSpec("baseline_scores_finite", asset="baseline_attributions", blocking=True,
                                   description="The baselines' score matrices hold no NaN or inf.")],
       code_version=CODE_VERSION)
def baseline_attributions(context: AssetExecutionContext, experiments: ExperimentsResource,
                          store: ArtifactStoreResource, compute: ComputeResource):
    """The registered baselines beside TRAK (ops/methods): TracIn over the saved checkpoints, and
    representation similarity; test x train scores and top attributions of each."""
    from ops import attribution

    key = context.partition_key
    summary = attribution.baseline_attributions(experiments.load(key), store.get(), key, compute.torch_device(),
                                                context.log.info)
    yield MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, "baseline_attributions")}))
    yield AssetCheckResult(check_name="baseline_scores_finite", passed=summary["finite"],
                           severity=AssetCheckSeverity.ERROR)


@asset(deps=["attribution_scores", "datamodel_weights", "baseline_attributions", "model_outputs",
             *source_deps("spec/lds")],
       partitions_def=experiments_partitions, group_name=GROUP, kinds={"parquet"},
       check_specs=[AssetCheckSpec("enough_heldout_models", asset="lds_evaluation",
                                   description="LDS rests on at least lds.min_heldout held-out subsets."),
                    AssetCheckSpec("lds_defined", asset="lds_evaluation",
                                   description="Every method's LDS is finite, and TRAK's rank correlation is "
                                               "defined (predictions and margins not constant) for most targets.")],
       code_version=CODE_VERSION)
def lds_evaluation(context: AssetExecutionContext, experiments: ExperimentsResource,
                   store: ArtifactStoreResource):
    """Linear datamodeling score of every registered attribution method on the held-out masks, with
    bootstrap intervals, and LDS against the number of models (table and plot)."""
    from ops import attribution

    key = context.partition_key
    spec = experiments.load(key)
    summary = attribution.lds_evaluation(spec, store.get(), key, context.log.info)
    curve = summary.pop("curve")
    png = attribution.plot_lds_curve(curve, store.get().path(key, attribution.LDS, "lds_curve.png"))
    md = metadata(summary, {"path": store.get().path(key, attribution.LDS)})
    md["lds_curve"] = MetadataValue.md(markdown(curve, drop=("experiment",)))
    md["lds_curve_plot"] = png_md(png, alt="LDS against number of models")
    yield MaterializeResult(metadata=md)
    yield AssetCheckResult(check_name="enough_heldout_models", passed=summary["n_heldout"] >= spec.lds.min_heldout,
                           severity=AssetCheckSeverity.WARN,
                           metadata={"n_heldout": summary["n_heldout"], "min_heldout": spec.lds.min_heldout})
    undefined = summary["undefined_targets"]
    finite = bool(all(np.isfinite(v) for k, v in summary.items() if k.startswith("lds_")))
    yield AssetCheckResult(check_name="lds_defined", passed=bool(finite and undefined.get("trak", 1.0) <= 0.5),
                           severity=AssetCheckSeverity.ERROR,
                           metadata={"all_finite": finite, **{f"undefined_share_{k}": v for k, v in undefined.items()}})
