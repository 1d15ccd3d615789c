"""Training: one model per subset mask (plus one on all data), fanned out in shards.

The checkpoints and model_outputs assets are one graph: ``plan_training`` lists the models the
store does not have yet and emits one dynamic output per shard, ``train_models`` trains a shard
(the multiprocess executor runs shards in parallel processes, other executors on other
machines), and ``collect_models`` gathers every model into the stacked checkpoint, the manifest
and the margins.  A model already in the store is never trained again.
"""
import warnings

import numpy as np

from dagster import (AssetCheckResult, PreviewWarning, AssetCheckSeverity, AssetIn, AssetOut, DynamicOut, DynamicOutput, In, Nothing,
                     OpExecutionContext, Out, Output, asset_check, graph_multi_asset, op)

from assets.common import code_version, experiments_partitions, metadata
from assets.sources import SOURCE_KEYS
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "training"


def at_chance(accuracy: float, chance: float) -> bool:
    """Within a tenth of the way from chance to perfect counts as chance."""
    return accuracy < chance + 0.1 * (1 - chance)


@op(ins={"loader_files": In(Nothing), "subset_masks": In(Nothing), "spec_training": In(Nothing)}, out=DynamicOut(list))
def plan_training(context: OpExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource):
    """One dynamic output per shard of models still missing from the store: the shard's jobs
    (model, seed, subset and store key), so each shard trains what this run planned."""
    from ops import training

    key = context.partition_key
    for i, jobs in enumerate(training.plan_shards(experiments.load(key), store.get(), key, context.log.info)):
        yield DynamicOutput(jobs, mapping_key=f"shard_{i}")


@op(pool="training")   # limits in the instance (cli.pool_limits): one step per device, or one on the CPU
def train_models(context: OpExecutionContext, shard: list, experiments: ExperimentsResource,
                 store: ArtifactStoreResource, compute: ComputeResource) -> int:
    """Train one shard of models and store each model under its key."""
    from ops import training

    key = context.partition_key
    return training.train_shard(experiments.load(key), store.get(), key, shard, compute.torch_device(),
                                context.log.info, name=context.get_mapping_key() or "shard")


@op(out={"checkpoints": Out(Nothing), "model_outputs": Out(Nothing)})
def collect_models(context: OpExecutionContext, trained: list[int], experiments: ExperimentsResource,
                   store: ArtifactStoreResource):
    from ops import training

    key = context.partition_key
    s = store.get()
    summary = training.collect_models(experiments.load(key), s, key, context.log.info)
    summary["trained_this_run"] = int(sum(trained))
    summary["reused"] = summary["models"] - summary["trained_this_run"]
    context.add_output_metadata(metadata(summary, {"path": s.path(key, training.CKPT, "models.safetensors")}),
                                output_name="checkpoints")
    context.add_output_metadata(metadata({"models": summary["models"]}, {"path": s.path(key, "model_outputs")}),
                                output_name="model_outputs")
    yield Output(None, output_name="checkpoints")
    yield Output(None, output_name="model_outputs")


@graph_multi_asset(
    outs={"checkpoints": AssetOut(group_name=GROUP, kinds={"pytorch", "safetensors"}, dagster_type=Nothing, code_version=CODE_VERSION,
                                  description="Every model's weights (safetensors, one file per model and "
                                              "stacked) and the model manifest."),
          "model_outputs": AssetOut(group_name=GROUP, kinds={"numpy"}, dagster_type=Nothing, code_version=CODE_VERSION,
                                    description="Margin of every model on every test (and train) example.")},
    ins={"loader_files": AssetIn("loader_files", dagster_type=Nothing),
         "subset_masks": AssetIn("subset_masks", dagster_type=Nothing),
         "spec_training": AssetIn(SOURCE_KEYS["spec/training"], dagster_type=Nothing)},
    partitions_def=experiments_partitions)
def checkpoints(loader_files, subset_masks, spec_training):
    trained = plan_training(loader_files=loader_files, subset_masks=subset_masks,
                            spec_training=spec_training).map(train_models)
    return collect_models(trained.collect())


def _chance_check(context, store: ArtifactStoreResource) -> AssetCheckResult:
    table = store.get().load_table(context.partition_key, "checkpoints", "models.parquet")
    meta = store.get().load_json(context.partition_key, "training_set", "meta.json")
    chance = 1.0 / len(meta["classes"])
    low = [a for a in table["accuracy"].to_list() if not np.isfinite(a) or at_chance(a, chance)]   # NaN fails too
    return AssetCheckResult(passed=not low, severity=AssetCheckSeverity.ERROR,
                            metadata={"models_at_chance": len(low), "chance": chance,
                                      "min_accuracy": float(table["accuracy"].min())})


with warnings.catch_warnings():   # partitioned asset checks are a Dagster 1.13 preview feature
    warnings.simplefilter("ignore", PreviewWarning)

    @asset_check(asset="checkpoints", partitions_def=experiments_partitions,
                 description="No model's test accuracy is at chance level.")
    def models_above_chance(context, store: ArtifactStoreResource) -> AssetCheckResult:
        return _chance_check(context, store)

    @asset_check(asset="model_outputs", partitions_def=experiments_partitions,
                 description="Every margin (test and train) is finite.")
    def margins_finite(context, store: ArtifactStoreResource) -> AssetCheckResult:
        return _margins_check(context, store)


def _margins_check(context, store: ArtifactStoreResource) -> AssetCheckResult:
    """Margins are what TRAK, datamodels and LDS regress on: a NaN or an infinity there (a diverged
    model, a degenerate dataset) makes every later number garbage, so it fails the run's checks
    rather than reporting success.  (A model predicting one class for everything is caught by
    ``models_above_chance``: its accuracy is that class's share.)"""
    s, key = store.get(), context.partition_key
    counts = {name: int((~np.isfinite(np.asarray(s.load_npy(key, "model_outputs", f"{name}.npy")))).sum())
              for name in ("margins_test", "margins_train")}
    return AssetCheckResult(passed=not any(counts.values()), severity=AssetCheckSeverity.ERROR,
                            metadata={f"non_finite_{k}": v for k, v in counts.items()})
