"""The 3DB study as an asset group (docs/studies.md): threedb_model -> threedb_results (render jobs
fanned out as dynamic ops) -> threedb_warehouse.  It runs for experiments whose spec has a
``threedb`` section; for the others its first asset materializes nothing and the rest is skipped."""
from dagster import (AssetExecutionContext, AssetIn, AssetSelection, DynamicOut, DynamicOutput, In,
                     MaterializeResult, MetadataValue, Nothing, OpExecutionContext, Out, Output, asset,
                     define_asset_job, graph_asset, op)
from dagster_duckdb import DuckDBResource

from assets.common import code_version, experiments_partitions, load_study_warehouse, metadata, png
from assets.sources import source_deps
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "threedb"


@asset(deps=source_deps("spec/threedb"), partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"pytorch", "safetensors"}, code_version=CODE_VERSION, output_required=False)
def threedb_model(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                  compute: ComputeResource):
    """The model under test: a classifier trained on rendered objects (reused while its settings
    are unchanged), or a torchvision model from weights on disk; its accuracy on held-out renders."""
    from ops import threedb_study

    key = context.partition_key
    spec = experiments.load(key)
    if spec.threedb is None:
        context.log.info(f"{key}: the spec has no threedb section; the study does not run")
        return
    summary = threedb_study.threedb_model(spec, store.get(), key, compute.torch_device(), context.log.info)
    yield Output(None, metadata=metadata(summary, {"path": store.get().path(key, threedb_study.MODEL)}))


@op(ins={"model": In(Nothing)}, out=DynamicOut(list))
def plan_renders(context: OpExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource):
    """One dynamic output per chunk of render jobs (objects x the policy's points)."""
    from ops import threedb_study

    key = context.partition_key
    chunks = threedb_study.plan_renders(experiments.load(key), store.get(), key)
    context.log.info(f"{sum(map(len, chunks))} render jobs in {len(chunks)} chunks")
    for i, ids in enumerate(chunks):
        yield DynamicOutput(ids, mapping_key=f"chunk_{i}")


@op
def render_chunk(context: OpExecutionContext, ids: list, experiments: ExperimentsResource,
                 store: ArtifactStoreResource, compute: ComputeResource) -> str:
    """Render one chunk of jobs and run the model on them (one renderer per process)."""
    from ops import threedb_study

    key = context.partition_key
    return threedb_study.render_chunk(experiments.load(key), store.get(), key, ids, compute.torch_device(),
                                      context.get_mapping_key() or "chunk", context.log.info)


@op(out=Out(Nothing))
def collect_renders(context: OpExecutionContext, names: list, experiments: ExperimentsResource,
                    store: ArtifactStoreResource):
    """Every chunk's records in one table; accuracy heatmaps over pairs of controls; the controls
    under which accuracy collapses."""
    from ops import threedb_study
    from ops.tables import markdown

    key = context.partition_key
    s = store.get()
    summary = threedb_study.collect_renders(experiments.load(key), s, key, sorted(names), context.log.info)
    plots = summary.pop("plots")
    md = metadata(summary, {"path": s.path(key, threedb_study.RESULTS)})
    for p in plots:
        md[p.rsplit("/", 1)[-1].removesuffix(".png")] = png(p, alt="accuracy heatmap")
    if summary["collapses"]:
        import polars as pl

        md["collapses_table"] = MetadataValue.md(markdown(pl.DataFrame(summary["collapses"])))
    context.add_output_metadata(md)
    yield Output(None)


@graph_asset(ins={"model": AssetIn("threedb_model", dagster_type=Nothing)}, partitions_def=experiments_partitions,
             group_name=GROUP, kinds={"pytorch"}, code_version=CODE_VERSION)
def threedb_results(model):
    """Renders of every job of the 3DB config, the model's prediction on each, per-parameter
    accuracy and accuracy heatmaps over pairs of controls."""
    return collect_renders(plan_renders(model=model).map(render_chunk).collect())


@asset(deps=["threedb_results"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"duckdb"},
       pool="duckdb", code_version=CODE_VERSION)
def threedb_warehouse(context: AssetExecutionContext, store: ArtifactStoreResource,
                      duckdb: DuckDBResource) -> MaterializeResult:
    """The study's tables (threedb_results, threedb_parameters, threedb_heatmaps) in the warehouse."""
    from ops import threedb_study

    key = context.partition_key
    s = store.get()
    frames = {name: s.load_table(key, threedb_study.RESULTS, f"{name}.parquet") for name in threedb_study.TABLES}
    return MaterializeResult(metadata=load_study_warehouse(key, s, duckdb.database, threedb_study.TABLES, frames))


ASSETS = [threedb_model, threedb_results, threedb_warehouse]
threedb_job = define_asset_job("threedb_job", selection=AssetSelection.groups(GROUP),
                               description="The 3DB study for one experiment (partition).")
