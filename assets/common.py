"""What every stage shares: the experiments partition, and turning a stage summary into metadata."""

import os

from dagster import DynamicPartitionsDefinition, MetadataValue

# seconds between sensor ticks (the tests shorten it)
SENSOR_INTERVAL = int(os.environ.get("PROVENANCE_SENSOR_INTERVAL", "30"))

experiments_partitions = DynamicPartitionsDefinition(name="experiments")


def metadata(summary: dict, paths: dict | None = None) -> dict:
    """Scalars become metadata entries, nested values JSON, artifact paths clickable paths."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, (dict, list)):
            out[k] = MetadataValue.json(v)
        elif v is None:
            out[k] = MetadataValue.text("n/a")
        else:
            out[k] = v.item() if hasattr(v, "item") else v   # numpy scalars -> Python
    for k, p in (paths or {}).items():
        out[k] = MetadataValue.path(str(p))
    return out



def table_metadata(schemas: dict, counts: dict) -> dict:
    """Per warehouse table: its column schema (a Dagster TableSchema) and this experiment's row count."""
    from dagster import TableColumn, TableSchema

    out = {}
    for table, cols in schemas.items():
        out[f"{table}/columns"] = MetadataValue.table_schema(TableSchema(columns=[TableColumn(n, t) for n, t in cols]))
        out[f"{table}/rows"] = MetadataValue.int(int(counts.get(table, 0)))
    return out
