"""The robustness study as an asset group (docs/studies.md): robust_models -> robustness_eval and
neural_response -> robustness_warehouse.  It runs for experiments whose spec has a
``robustness`` section; for the others its first asset materializes nothing and the rest are
skipped (and ``./provenance run``, the sensor and the schedule never select them)."""
from dagster import (AssetExecutionContext, AssetSelection, MaterializeResult, MetadataValue, Output, asset,
                     define_asset_job)
from dagster_duckdb import DuckDBResource

from assets.common import code_version, experiments_partitions, load_study_warehouse, metadata, png
from assets.sources import source_deps
from ops.tables import markdown
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "robustness"


@asset(deps=["loader_files", *source_deps("spec/robustness")], partitions_def=experiments_partitions,
       group_name=GROUP, kinds={"pytorch", "safetensors"}, code_version=CODE_VERSION, output_required=False)
def robust_models(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                  compute: ComputeResource):
    """K models per training budget (standard, and PGD-AT at each ``eps_train``) on the whole
    training split, on the training engine; models/hour of adversarial against plain training."""
    from ops import robustness

    key = context.partition_key
    spec = experiments.load(key)
    if spec.robustness is None:
        context.log.info(f"{key}: the spec has no robustness section; the study does not run")
        return
    summary = robustness.robust_models(spec, store.get(), key, compute.torch_device(), context.log.info)
    yield Output(None, metadata=metadata(summary, {"path": store.get().path(key, robustness.MODELS)}))


@asset(deps=["robust_models"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch"},
       code_version=CODE_VERSION)
def robustness_eval(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                    compute: ComputeResource) -> MaterializeResult:
    """Natural and robust accuracy (white-box PGD through the whole ensemble) of robust ensembles
    and of robust + standard feature fusion; robust accuracy against ε; the ensembles claim, checked."""
    from ops import robustness

    key = context.partition_key
    s = store.get()
    summary = robustness.robustness_eval(experiments.load(key), s, key, compute.torch_device(), context.log.info)
    table = s.load_table(key, robustness.EVAL, "robustness.parquet")
    curve = s.load_table(key, robustness.EVAL, "robustness_curve.parquet")
    md = metadata(summary, {"path": s.path(key, robustness.EVAL)})
    md["table"] = MetadataValue.md(markdown(table, drop=("experiment",), digits=4))
    md["robust_accuracy_vs_eps"] = MetadataValue.md(
        markdown(curve.pivot(on="eps_train", index="eps", values="robust_accuracy", sort_columns=True), digits=4))
    md["plot"] = png(s.path(key, robustness.EVAL, "robustness_curve.png"))
    return MaterializeResult(metadata=md)


@asset(deps=["robust_models"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch"},
       code_version=CODE_VERSION)
def neural_response(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                    compute: ComputeResource):
    """Attacks on a neural-response proxy (a frozen robust network with trial noise as the
    "brain"): realized response change through standard and robust surrogates, against random noise
    and each network's own sensitivity.  Real recordings are not included (README)."""
    from ops import robustness

    key = context.partition_key
    spec = experiments.load(key)
    if not spec.robustness.neural.enabled:
        context.log.info(f"{key}: robustness.neural.enabled is false")
        yield Output(None, metadata={"enabled": False})
        return
    s = store.get()
    summary = robustness.neural_response(spec, s, key, compute.torch_device(), context.log.info)
    table = s.load_table(key, robustness.NEURAL, "neural_attacks.parquet")
    md = metadata(summary, {"path": s.path(key, robustness.NEURAL)})
    md["table"] = MetadataValue.md(markdown(table, drop=("experiment",), digits=4))
    md["plot"] = png(s.path(key, robustness.NEURAL, "neural_attacks.png"))
    yield Output(None, metadata=md)


@asset(deps=["robustness_eval", "neural_response"], partitions_def=experiments_partitions, group_name=GROUP,
       kinds={"duckdb"}, pool="duckdb", code_version=CODE_VERSION)
def robustness_warehouse(context: AssetExecutionContext, store: ArtifactStoreResource,
                         duckdb: DuckDBResource) -> MaterializeResult:
    """The study's tables (robustness, robustness_curve, neural_attacks) in the warehouse."""
    from ops import robustness

    key = context.partition_key
    s = store.get()
    frames = {"robustness": s.load_table(key, robustness.EVAL, "robustness.parquet"),
              "robustness_curve": s.load_table(key, robustness.EVAL, "robustness_curve.parquet")}
    if s.path(key, robustness.NEURAL, "neural_attacks.parquet").exists():
        frames["neural_attacks"] = s.load_table(key, robustness.NEURAL, "neural_attacks.parquet")
    return MaterializeResult(metadata=load_study_warehouse(key, s, duckdb.database, robustness.TABLES, frames))


ASSETS = [robust_models, robustness_eval, neural_response, robustness_warehouse]
robustness_job = define_asset_job("robustness_job", selection=AssetSelection.groups(GROUP),
                                  description="The robustness study for one experiment (partition).")
