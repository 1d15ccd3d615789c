"""Training: one model per subset mask (plus one on all data), and their outputs."""

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetSpec,
                     MaterializeResult, multi_asset)

from assets.common import experiments_partitions, metadata
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

GROUP = "training"


def at_chance(accuracy: float, chance: float) -> bool:
    """Within a tenth of the way from chance to perfect counts as chance."""
    return accuracy < chance + 0.1 * (1 - chance)


@multi_asset(
    specs=[AssetSpec("checkpoints", deps=["loader_files", "subset_masks"], group_name=GROUP,
                     kinds={"pytorch", "safetensors"},
                     description="Trained weights of every model (safetensors) and the model manifest."),
           AssetSpec("model_outputs", deps=["loader_files", "subset_masks"], group_name=GROUP, kinds={"numpy"},
                     description="Margin of every model on every test (and train) example.")],
    check_specs=[AssetCheckSpec("models_above_chance", asset="checkpoints",
                                description="No model's test accuracy is at chance level.")],
    partitions_def=experiments_partitions, code_version="1")
def checkpoints(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                compute: ComputeResource):
    from ops import training

    key = context.partition_key
    s = store.get()
    summary = training.checkpoints(experiments.load(key), s, key, compute.torch_device(), context.log.info)
    table = s.load_table(key, training.CKPT, "models.parquet")
    low = table[[at_chance(a, summary["chance"]) for a in table["accuracy"]]]
    yield MaterializeResult(asset_key="checkpoints", metadata=metadata(
        summary, {"path": s.path(key, training.CKPT, "models.safetensors")}))
    yield MaterializeResult(asset_key="model_outputs", metadata=metadata(
        {"models": summary["models"]}, {"path": s.path(key, "model_outputs")}))
    yield AssetCheckResult(check_name="models_above_chance", asset_key="checkpoints", passed=low.empty,
                           severity=AssetCheckSeverity.ERROR,
                           metadata={"models_at_chance": len(low), "chance": summary["chance"],
                                     "min_accuracy": float(table["accuracy"].min())})
