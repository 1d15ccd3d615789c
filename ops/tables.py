"""Small helpers for the polars tables the ops build (Parquet via pyarrow, DuckDB via Arrow)."""
from __future__ import annotations

import polars as pl


def markdown(df: pl.DataFrame, drop: tuple[str, ...] = (), digits: int | None = None) -> str:
    """A table as GitHub markdown (for Dagster's markdown metadata), ``drop`` columns left out and
    floats rounded to ``digits`` when given; nulls print empty."""
    from tabulate import tabulate

    df = df.drop([c for c in drop if c in df.columns])
    if digits is not None:
        df = df.with_columns(pl.col(pl.Float32, pl.Float64).round(digits))
    return tabulate(df.rows(), headers=df.columns, tablefmt="pipe", missingval="")
