"""Data stages: raw_dataset -> training_set (+ poison_truth) -> loader_files, subset_masks."""

from dagster import AssetExecutionContext, AssetSpec, MaterializeResult, asset, multi_asset

from assets.common import code_version, experiments_partitions, metadata
from assets.sources import source_deps
from resources import ArtifactStoreResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "data"


@asset(deps=source_deps("dataset_source", "spec/dataset"), partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"}, code_version=CODE_VERSION)
def raw_dataset(context: AssetExecutionContext, experiments: ExperimentsResource,
                store: ArtifactStoreResource) -> MaterializeResult:
    """Images, labels, stable ids and the train/test split read from the spec's source."""
    from ops import data
    from ops.spec import validate_against_data

    key = context.partition_key
    spec = experiments.load(key)
    validate_against_data(spec, str(experiments.spec_path(key)))
    summary = data.raw_dataset(spec, store.get(), key)
    return MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, data.RAW)}))


@multi_asset(
    specs=[AssetSpec("training_set", deps=["raw_dataset", *source_deps("spec/attack")], group_name=GROUP, kinds={"numpy"},
                     description="The training split after the spec's attack, and the triggered test set."),
           AssetSpec("poison_truth", deps=["raw_dataset", *source_deps("spec/attack")], group_name=GROUP, kinds={"parquet"},
                     description="Which training examples were poisoned (null where unknown).")],
    partitions_def=experiments_partitions, code_version=CODE_VERSION)
def training_set(context: AssetExecutionContext, experiments: ExperimentsResource,
                 store: ArtifactStoreResource):
    from ops import data

    key = context.partition_key
    s = store.get()
    summary = data.training_set(experiments.load(key), s, key)
    yield MaterializeResult(asset_key="training_set",
                            metadata=metadata(summary, {"path": s.path(key, data.TRAIN)}))
    yield MaterializeResult(asset_key="poison_truth",
                            metadata=metadata({"poisoned": summary["poisoned"], "truth_known": summary["truth_known"]},
                                              {"path": s.path(key, data.TRAIN, "poison_truth.parquet")}))


@asset(deps=["training_set"], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"}, code_version=CODE_VERSION)
def loader_files(context: AssetExecutionContext, experiments: ExperimentsResource,
                 store: ArtifactStoreResource) -> MaterializeResult:
    """Train, test and triggered-test splits in the loader file format (docs/formats.md)."""
    from ops import data

    key = context.partition_key
    summary = data.loader_files(experiments.load(key), store.get(), key)
    return MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, data.LOADER)}))


@asset(deps=["training_set", *source_deps("spec/subsets")], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"numpy"}, code_version=CODE_VERSION)
def subset_masks(context: AssetExecutionContext, experiments: ExperimentsResource,
                 store: ArtifactStoreResource) -> MaterializeResult:
    """Seeded boolean masks, each an alpha-fraction of the training set; train and held-out rows."""
    from ops import data

    key = context.partition_key
    summary = data.subset_masks(experiments.load(key), store.get(), key)
    return MaterializeResult(metadata=metadata(summary, {"path": store.get().path(key, data.MASKS, "masks.npy")}))
