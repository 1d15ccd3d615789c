"""The Smallify study as an asset group (docs/studies.md): smallify_runs -> smallify_warehouse.
It runs for experiments whose spec has a ``smallify`` section; for the others its first asset
materializes nothing and the rest is skipped."""
from dagster import (AssetExecutionContext, AssetSelection, MaterializeResult, MetadataValue, Output, asset,
                     define_asset_job)
from dagster_duckdb import DuckDBResource

from assets.common import code_version, experiments_partitions, load_study_warehouse, metadata, png
from assets.sources import source_deps
from ops.tables import markdown
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "smallify"


@asset(deps=["loader_files", *source_deps("spec/smallify")], partitions_def=experiments_partitions,
       group_name=GROUP, kinds={"pytorch"}, code_version=CODE_VERSION, output_required=False)
def smallify_runs(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                  compute: ComputeResource):
    """Pruning during training (switch layers, an L1 penalty, neurons and channels removed as their
    switches' signs start to flip) for each λ, against statically sized networks of a width grid
    with the same budget: parameters, test accuracy and CPU latency of each, and how close the
    result comes to the paper's "35× smaller, 6× faster at similar accuracy"."""
    from ops import smallify

    key = context.partition_key
    spec = experiments.load(key)
    if spec.smallify is None:
        context.log.info(f"{key}: the spec has no smallify section; the study does not run")
        return
    s = store.get()
    summary = smallify.smallify_runs(spec, s, key, compute.torch_device(), context.log.info)
    md = metadata(summary, {"path": s.path(key, smallify.RUNS)})
    md["table"] = MetadataValue.md(markdown(s.load_table(key, smallify.RUNS, "smallify.parquet"),
                                            drop=("experiment",), digits=4))
    md["accuracy_vs_size"] = png(s.path(key, smallify.RUNS, "accuracy_vs_size.png"), alt="accuracy against size")
    yield Output(None, metadata=md)


@asset(deps=["smallify_runs"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"duckdb"},
       pool="duckdb", code_version=CODE_VERSION)
def smallify_warehouse(context: AssetExecutionContext, store: ArtifactStoreResource,
                       duckdb: DuckDBResource) -> MaterializeResult:
    """The study's tables (smallify, smallify_history) in the warehouse."""
    from ops import smallify

    key = context.partition_key
    s = store.get()
    frames = {name: s.load_table(key, smallify.RUNS, f"{name}.parquet") for name in smallify.TABLES}
    return MaterializeResult(metadata=load_study_warehouse(key, s, duckdb.database, smallify.TABLES, frames))


ASSETS = [smallify_runs, smallify_warehouse]
smallify_job = define_asset_job("smallify_job", selection=AssetSelection.groups(GROUP),
                                description="The Smallify study for one experiment (partition).")
