"""What every stage shares: the experiments partition, and turning a stage summary into metadata."""

import ast
import functools
import hashlib
import os
from pathlib import Path

from dagster import DynamicPartitionsDefinition, MetadataValue

# seconds between sensor ticks (the tests shorten it)
SENSOR_INTERVAL = int(os.environ.get("PROVENANCE_SENSOR_INTERVAL", "30"))

experiments_partitions = DynamicPartitionsDefinition(name="experiments")

_OWN = ("ops", "kernels")     # followed transitively; the assets' own modules are named explicitly


_ROOT = Path(__file__).resolve().parents[1]     # where the top-level packages ops, kernels, assets lie


def _module_file(name: str) -> Path | None:
    base = _ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _imports(name: str, path: Path) -> frozenset[str]:
    """The project's own modules that ``name``'s source imports (anywhere in the file), read with
    ``ast`` so that nothing is imported (torch stays out of the definitions' load)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in _OWN}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in _OWN:
            for a in node.names:    # ``from ops import backdoor`` names a module; ``from ops.x import f`` does not
                sub = f"{node.module}.{a.name}"
                out.add(sub if _module_file(sub) else node.module)
    return frozenset(m for m in out if _module_file(m))     # a namespace package itself has no source


@functools.cache
def code_version(*modules: str) -> str:
    """A code version that changes when the code that makes an asset changes: a digest of the source
    of ``modules`` (the asset's own module and the ops it calls) and of every ``ops``/``kernels``
    module they import, transitively.  An edit to any of them makes Dagster mark the asset (and what is
    downstream) stale; an edit elsewhere does not."""
    seen, todo = {}, list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            raise ValueError(f"code_version: no Python source for module {name!r}")
        seen[name] = path
        todo.extend(_imports(name, path) - set(seen))
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + seen[name].read_bytes() + b"\0")
    return h.hexdigest()[:12]


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


def png(path, caption: str = "", alt: str = "plot") -> MetadataValue:
    """A PNG file as markdown metadata (inline, base64), with an optional caption above it."""
    import base64

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return MetadataValue.md((f"{caption}\n\n" if caption else "") + f"![{alt}](data:image/png;base64,{data})")


def load_study_warehouse(key: str, store, database: str, tables: dict, frames: dict):
    """A study's last asset: its tables (``tables``: name -> DDL columns; ``frames``: name -> polars
    frame) into the warehouse for experiment ``key``, and the metadata Dagster shows for them."""
    from ops.warehouse import load_study_tables, table_schemas, writing

    with writing(Path(database)) as conn:
        counts = load_study_tables(conn, key, tables, frames)
        schemas = table_schemas(conn, counts)
    return {"rows": MetadataValue.json(counts), "dagster/row_count": MetadataValue.int(int(sum(counts.values()))),
            **table_metadata(schemas, counts)}

