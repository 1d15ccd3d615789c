"""The DuckDB warehouse: a table for every result, keyed by experiment."""

from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset
from dagster_duckdb import DuckDBResource

from assets.common import code_version, experiments_partitions, table_metadata
from assets.sources import source_deps
from resources import ArtifactStoreResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)


@asset(deps=["training_set", "subset_masks", "checkpoints", "model_outputs", "attribution_scores",
             "datamodel_weights", "baseline_attributions", "lds_evaluation", "backdoor_report",
             *source_deps("spec/other")],
       partitions_def=experiments_partitions, group_name="warehouse", kinds={"duckdb"}, pool="duckdb",
       code_version=CODE_VERSION)
def warehouse(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
              duckdb: DuckDBResource) -> MaterializeResult:
    """Loads this experiment's rows into every warehouse table (docs/tables.md)."""
    from ops.report import experiment_report
    from ops.warehouse import load_experiment, table_schemas, writing

    key = context.partition_key
    # a private copy, renamed into place: readers keep their snapshot, writers take turns
    with writing(Path(duckdb.database)) as conn:
        counts = load_experiment(conn, store.get(), key, experiments.load(key))
        report = experiment_report(conn, key)
        schemas = table_schemas(conn, counts)
    context.log.info("\n" + report)
    return MaterializeResult(metadata={"database": MetadataValue.path(duckdb.database),
                                       "rows": MetadataValue.json(counts),
                                       "dagster/row_count": MetadataValue.int(int(sum(counts.values()))),
                                       "report": MetadataValue.md(f"```\n{report}\n```"),
                                       **table_metadata(schemas, counts)})
