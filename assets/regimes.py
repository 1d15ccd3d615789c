"""The two-regimes study as an asset group (docs/studies.md): regimes_runs -> regimes_warehouse.
It runs for experiments whose spec has a ``regimes`` section; for the others its first asset
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

GROUP = "regimes"


@asset(deps=["loader_files", *source_deps("spec/regimes")], partitions_def=experiments_partitions,
       group_name=GROUP, kinds={"pytorch"}, code_version=CODE_VERSION, output_required=False)
def regimes_runs(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                 compute: ComputeResource):
    """Each learning-rate schedule (step, one-cycle, two-regime, small steps only) over seeds at
    one epoch budget, and the momentum / learning-rate equivalence sweep of the large-step phase;
    which of the paper's claims held."""
    import polars as pl

    from ops import regimes

    key = context.partition_key
    spec = experiments.load(key)
    if spec.regimes is None:
        context.log.info(f"{key}: the spec has no regimes section; the study does not run")
        return
    s = store.get()
    summary = regimes.regimes_runs(spec, s, key, compute.torch_device(), context.log.info)
    md = metadata(summary, {"path": s.path(key, regimes.RUNS)})
    md["accuracy"] = MetadataValue.md(markdown(
        s.load_table(key, regimes.RUNS, "regimes.parquet").group_by("schedule", maintain_order=True).agg(
            test_accuracy_mean=pl.col("test_accuracy").mean(),
            test_accuracy_std=pl.col("test_accuracy").std(), seeds=pl.len()), digits=4))
    md["momentum_equivalence"] = MetadataValue.md(markdown(
        s.load_table(key, regimes.RUNS, "momentum_equivalence.parquet"), drop=("experiment",), digits=4))
    md["loss_curves"] = png(s.path(key, regimes.RUNS, "loss_curves.png"), alt="loss curves")
    yield Output(None, metadata=md)


@asset(deps=["regimes_runs"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"duckdb"},
       pool="duckdb", code_version=CODE_VERSION)
def regimes_warehouse(context: AssetExecutionContext, store: ArtifactStoreResource,
                      duckdb: DuckDBResource) -> MaterializeResult:
    """The study's tables (regimes, regimes_curve, momentum_equivalence) in the warehouse."""
    from ops import regimes

    key = context.partition_key
    s = store.get()
    frames = {name: s.load_table(key, regimes.RUNS, f"{name}.parquet") for name in regimes.TABLES}
    return MaterializeResult(metadata=load_study_warehouse(key, s, duckdb.database, regimes.TABLES, frames))


ASSETS = [regimes_runs, regimes_warehouse]
regimes_job = define_asset_job("regimes_job", selection=AssetSelection.groups(GROUP),
                               description="The two-regimes study for one experiment (partition).")
