"""Attribution: TRAK features and scores, datamodels, and their LDS."""

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext,
                     MaterializeResult, asset)

from assets.common import experiments_partitions, metadata
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

GROUP = "attribution"


@asset(deps=["checkpoints"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch", "numpy"},
       check_specs=[AssetCheckSpec("features_finite", asset="gradient_features", blocking=True,
                                   description="Projected gradients and Q hold no NaN or inf.")],
       code_version="1")
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
       code_version="1")
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


@asset(deps=["model_outputs", "subset_masks"], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"}, code_version="1")
def datamodel_weights(context: AssetExecutionContext, experiments: ExperimentsResource,
                      store: ArtifactStoreResource) -> MaterializeResult:
    """One sparse linear model per target (LASSO from masks to margins), lambda chosen on held-out models."""
    from ops import attribution

    key = context.partition_key
    summary = attribution.datamodel_weights(experiments.load(key), store.get(), key, context.log.info)
    return MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, attribution.DM)}))


@asset(deps=["attribution_scores", "datamodel_weights", "model_outputs"], partitions_def=experiments_partitions,
       group_name=GROUP, kinds={"parquet"},
       check_specs=[AssetCheckSpec("enough_heldout_models", asset="lds_evaluation",
                                   description="LDS rests on at least lds.min_heldout held-out subsets.")],
       code_version="1")
def lds_evaluation(context: AssetExecutionContext, experiments: ExperimentsResource,
                   store: ArtifactStoreResource):
    """Linear datamodeling score of each attribution method on the held-out masks."""
    from ops import attribution

    key = context.partition_key
    spec = experiments.load(key)
    summary = attribution.lds_evaluation(spec, store.get(), key, context.log.info)
    yield MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, attribution.LDS)}))
    yield AssetCheckResult(check_name="enough_heldout_models", passed=summary["n_heldout"] >= spec.lds.min_heldout,
                           severity=AssetCheckSeverity.WARN,
                           metadata={"n_heldout": summary["n_heldout"], "min_heldout": spec.lds.min_heldout})
