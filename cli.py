"""Command line: ``provenance run|validate|report|sql``.

``run`` materializes the whole lineage of one experiment in the project's Dagster instance
(``$PROVENANCE_HOME/dagster``), so the Dagster UI started on the same home shows the run, its
logs, asset metadata and checks.  Everything ``run`` writes is keyed by the experiment name.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _home() -> Path:
    from definitions import home

    return home()


def ensure_dagster_home(home: Path) -> Path:
    """The project's Dagster instance: SQLite storage under ``home/dagster``, telemetry off."""
    d = home / "dagster"
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")
    return d


def _resolve_spec(arg: str) -> Path:
    p = Path(arg)
    if p.suffix not in (".yaml", ".yml"):
        from definitions import PROJECT

        p = Path(os.environ.get("PROVENANCE_EXPERIMENTS", PROJECT / "experiments")) / f"{arg}.yaml"
    return p.resolve()


def cmd_validate(args) -> int:
    from ops.spec import SpecError, load_spec_file, validate_against_data

    try:
        spec = load_spec_file(_resolve_spec(args.spec))
        counts = validate_against_data(spec, args.spec)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{spec.name}: valid ({sum(counts.values())} training examples in {len(counts)} classes)")
    return 0


def cmd_run(args) -> int:
    from ops.spec import SpecError, load_spec_file, validate_against_data

    path = _resolve_spec(args.spec)
    try:
        spec = load_spec_file(path)
        validate_against_data(spec, str(path))
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    if args.device:
        os.environ["PROVENANCE_DEVICE"] = args.device
    home = _home()
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(home))

    from dagster import DagsterInstance, materialize

    from assets import ALL_ASSETS, ALL_CHECKS, experiments_partitions
    from definitions import make_resources

    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition(experiments_partitions.name, spec.name):
        instance.add_dynamic_partitions(experiments_partitions.name, [spec.name])
    t0 = time.perf_counter()
    result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=spec.name, instance=instance, raise_on_error=False,
                         resources=make_resources(home, path.parent),
                         run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}})
    elapsed = time.perf_counter() - t0
    if not result.success:
        print(f"run {result.run_id} failed after {elapsed:.0f}s; see the log above or the Dagster UI",
              file=sys.stderr)
        return 1
    failed = [e.check_name for e in result.get_asset_check_evaluations()
              if not e.passed]
    print()
    print(_report(home, spec.name))
    print(f"\n  run {result.run_id} finished in {elapsed:.0f}s; warehouse {home / 'warehouse.duckdb'}")
    if failed:
        print(f"  failed asset checks: {', '.join(failed)}")
    return 0


def _report(home: Path, exp: str) -> str:
    import duckdb

    from ops.report import experiment_report

    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        return experiment_report(conn, exp)


def cmd_report(args) -> int:
    try:
        print(_report(_home(), args.experiment))
    except Exception as e:  # KeyError for an unknown experiment, duckdb's IOException for no warehouse
        print(f"no report for {args.experiment!r}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_sql(args) -> int:
    import duckdb

    db = _home() / "warehouse.duckdb"
    if not db.exists():
        print(f"{db} does not exist yet: run an experiment first", file=sys.stderr)
        return 1
    with duckdb.connect(str(db), read_only=True) as conn:
        try:
            rel = conn.sql(args.query)
        except duckdb.Error as e:
            print(e, file=sys.stderr)
            return 1
        if rel is not None:
            rel.show(max_rows=args.max_rows, max_width=200)
    return 0


def cmd_home(args) -> int:
    """Prints the Dagster home (creating it), for ./provenance ui."""
    print(ensure_dagster_home(_home()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="provenance", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole lineage of an experiment and print its report")
    r.add_argument("spec", help="experiment name (experiments/<name>.yaml) or path to a spec")
    r.add_argument("--device", help="auto | cpu | cuda (default: $PROVENANCE_DEVICE or auto)")
    r.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check a spec (and its dataset's labels) without running it")
    v.add_argument("spec")
    v.set_defaults(fn=cmd_validate)
    rep = sub.add_parser("report", help="print the report of a materialized experiment")
    rep.add_argument("experiment")
    rep.set_defaults(fn=cmd_report)
    s = sub.add_parser("sql", help="run a SQL query against the warehouse (read-only)")
    s.add_argument("query")
    s.add_argument("--max-rows", type=int, default=40)
    s.set_defaults(fn=cmd_sql)
    h = sub.add_parser("dagster-home", help="print (and create) the Dagster instance folder")
    h.set_defaults(fn=cmd_home)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
