"""Command line: ``provenance run|validate|report|sql|score|stale|delete``.

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


INSTANCE_YAML = """telemetry:
  enabled: false
run_monitoring:           # the daemon fails runs that never start or whose worker is gone
  enabled: true
  start_timeout_seconds: 300
"""


def ensure_dagster_home(home: Path) -> Path:
    """The project's Dagster instance: SQLite storage under ``home/dagster``, telemetry off.
    Created once under a file lock, so two commands started together on a fresh home do not race
    on the configuration or on the storage's schema."""
    import fcntl

    d = home / "dagster"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = d / "dagster.yaml"
        if not cfg.exists():
            tmp = d / f".dagster.yaml.{os.getpid()}"
            tmp.write_text(INSTANCE_YAML)
            os.replace(tmp, cfg)
        ready = d / ".storage-ready"
        if not ready.exists():          # create the SQLite schemas now, one process at a time
            from dagster import DagsterInstance

            DagsterInstance.from_config(str(d)).dispose()
            ready.touch()
        pools = d / ".pools-v1"
        if not pools.exists():          # concurrency limits, once (a user may change them in the UI)
            from dagster import DagsterInstance

            instance = DagsterInstance.from_config(str(d))
            try:
                for pool, limit in pool_limits().items():
                    instance.event_log_storage.set_concurrency_slots(pool, limit)
            finally:
                instance.dispose()
            pools.touch()
    return d


def pool_limits() -> dict[str, int]:
    """The instance's pool limits (Dagster op concurrency): ``duckdb`` 1 (the warehouse has one
    writer); ``training`` one step per CUDA device, or 1 on a CPU-only machine, where a training
    step already runs one model per core (kernels/train.py): executor processes x training workers
    never exceed the cores."""
    import importlib.util

    gpus = 0
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"duckdb": 1, "training": max(1, gpus)}


PID_TAG, HOST_TAG = "provenance/pid", "provenance/host"


def fail_dead_runs(instance) -> list[str]:
    """Runs that ``./provenance run`` started on this machine and whose process is gone (killed,
    crashed) but that the instance still shows as started: marked failed, with the reason."""
    import socket

    from dagster import DagsterRunStatus, RunsFilter

    dead = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING,
                                                      DagsterRunStatus.NOT_STARTED])):
        pid, host = run.tags.get(PID_TAG), run.tags.get(HOST_TAG)
        if not str(pid).isdigit() or host != socket.gethostname() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                    # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                    # alive, another user's
        instance.report_run_failed(run, message=f"process {pid} that ran it is gone (killed or crashed); "
                                                f"marked failed by ./provenance")
        dead.append(run.run_id)
    # pool slots (cli.pool_limits) still held by runs that are over, such as a killed run's: freed,
    # or the next run would wait for them forever
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return dead


def _resolve_spec(arg: str) -> Path:
    """A spec path (relative to the user's directory) or an experiment name (a file in
    $PROVENANCE_EXPERIMENTS, default the checkout's experiments/)."""
    from definitions import experiments_dir
    from ops.spec import user_path

    if Path(arg).suffix in (".yaml", ".yml"):
        return user_path(arg).resolve()
    return experiments_dir() / f"{arg}.yaml"


def _store_resource(home: Path):
    from resources import ArtifactStoreResource

    return ArtifactStoreResource(root=str(home / "artifacts"), url=os.environ.get("PROVENANCE_STORE_URL", ""))


def cmd_validate(args) -> int:
    from ops.spec import SpecError, load_spec_file, validate_against_data

    try:
        spec = load_spec_file(_resolve_spec(args.spec))
        counts = validate_against_data(spec, args.spec, probe_images=True)
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
        validate_against_data(spec, str(path), probe_images=True)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    if args.study:
        from assets.studies import STUDIES, named

        if args.study not in named(spec):
            print(f"--study {args.study}: the spec names {', '.join(named(spec)) or 'no study'} (studies: "
                  f"{', '.join(STUDIES)})", file=sys.stderr)
            return 2
    from resources import DeviceError, resolve_device

    if args.device:
        os.environ["PROVENANCE_DEVICE"] = args.device
    try:
        resolve_device(os.environ.get("PROVENANCE_DEVICE", "auto"))
    except DeviceError as e:
        print(e, file=sys.stderr)
        return 2
    home = _home()
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(home))

    from dagster import DagsterInstance, materialize

    from assets import ALL_ASSETS, ALL_CHECKS, experiments_partitions
    from definitions import make_resources

    import socket

    instance = DagsterInstance.get()
    for run_id in fail_dead_runs(instance):
        print(f"run {run_id} was left as started by a process that is gone: marked failed", file=sys.stderr)
    if not instance.has_dynamic_partition(experiments_partitions.name, spec.name):
        instance.add_dynamic_partitions(experiments_partitions.name, [spec.name])
    from assets.sensors import EXPERIMENT_TAG
    from assets.sources import record
    from ops.spec import SPEC_TAG
    from ops.versions import versions

    t0 = time.perf_counter()
    # what this run reads, as the sources' data versions (stale status), and the spec it pins
    record(instance, spec.name, versions(spec, home / "artifacts" / ".cache" / "file_digests.json"))
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), EXPERIMENT_TAG: spec.name,
            SPEC_TAG: _store_resource(home).pin(spec)}
    from assets.studies import named, selection_for

    selection = _selection(instance, spec) if args.stale else selection_for(spec)
    if args.study:     # only that study and what it reads (checked before anything was written)
        from dagster import AssetSelection

        from assets.studies import STUDIES, unnamed_keys

        # upstream() alone can split a multi-asset (training_set without poison_truth): take its
        # required neighbours too
        selection = (AssetSelection.groups(STUDIES[args.study][0]).upstream().required_multi_asset_neighbors()
                     - AssetSelection.assets(*unnamed_keys(spec)))
    if named(spec):
        print(f"{spec.name}: with the studies {', '.join(named(spec))}", file=sys.stderr)
    if selection == []:
        print(f"{spec.name}: nothing is stale; nothing to run")
        return 0
    result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=spec.name, instance=instance, raise_on_error=False,
                         tags=tags, selection=selection,
                         resources=make_resources(home, path.parent),
                         run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}})
    elapsed = time.perf_counter() - t0
    if not result.success:
        reason = _first_failure(result)
        print(f"run {result.run_id} failed after {elapsed:.0f}s"
              + (f": {reason}" if reason else "") + "\n  (the log above and the Dagster UI have the details)",
              file=sys.stderr)
        return 1
    from dagster import AssetCheckSeverity

    evals = [e for e in result.get_asset_check_evaluations() if not e.passed]
    errors = [e.check_name for e in evals if e.severity == AssetCheckSeverity.ERROR]
    print()
    print(_report(home, spec.name))
    print(f"\n  run {result.run_id} finished in {elapsed:.0f}s; warehouse {home / 'warehouse.duckdb'}")
    warned = [e.check_name for e in evals if e.severity != AssetCheckSeverity.ERROR]
    if warned:
        print(f"  asset checks that warn: {', '.join(warned)}")
    if errors:   # the results rest on garbage (non-finite margins or scores, models at chance...)
        print(f"run {result.run_id}: asset checks failed: {', '.join(errors)} (their metadata in the Dagster UI "
              f"says what is wrong); the results above are not to be trusted", file=sys.stderr)
        return 3
    return 0


def _selection(instance, spec):
    """The stale and never-materialized assets of the experiment and everything downstream of
    them, within the core lineage and the studies its spec names."""
    from dagster import AssetKey, AssetSelection

    from assets.sources import stale_assets
    from assets.studies import selection_for, unnamed_keys

    stale = stale_assets(instance, spec.name, exclude=unnamed_keys(spec))
    print(f"{spec.name}: stale or missing: {', '.join(stale) or 'nothing'}", file=sys.stderr)
    if not stale:
        return []
    return AssetSelection.assets(*[AssetKey.from_user_string(k) for k in stale]).downstream() & selection_for(spec)


def cmd_stale(args) -> int:
    """Observes the experiment's sources (its spec's sections, its dataset's files) and prints what
    Dagster now considers stale, with the causes: what the next run, or the UI, would re-materialize."""
    from ops.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(_resolve_spec(args.experiment))
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    home = _home()
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(home))
    from dagster import DagsterInstance

    from assets.sources import record, stale_assets
    from assets.studies import unnamed_keys
    from ops.versions import versions

    with DagsterInstance.get() as instance:
        changed = record(instance, spec.name, versions(spec, home / "artifacts" / ".cache" / "file_digests.json"))
        stale = stale_assets(instance, spec.name, exclude=unnamed_keys(spec))
    if changed:
        print(f"{spec.name}: changed since last observed: {', '.join(sorted(changed))}")
    if not stale:
        print(f"{spec.name}: every asset is up to date")
    for key, causes in stale.items():
        print(f"{key:<24} {'; '.join(causes)}")
    return 0


def cmd_delete(args) -> int:
    """Deletes an experiment: its artifacts (models, features, scores, inbox), its warehouse rows and
    its Dagster partition (run history stays in the instance's event log).  The spec file must be
    gone first, or be removed with ``--spec``, or the specs sensor would bring the experiment back."""
    import shutil

    from definitions import experiments_dir
    from ops.spec import NAME_RE

    name, home = args.experiment, _home()
    if not NAME_RE.match(name):
        print(f"delete: {name!r} is not an experiment name", file=sys.stderr)
        return 2
    spec_file = experiments_dir() / f"{name}.yaml"
    artifacts = home / "artifacts" / name
    db = home / "warehouse.duckdb"
    if spec_file.exists() and not args.spec:
        print(f"delete: {spec_file} still exists; remove it first, or pass --spec to delete it too",
              file=sys.stderr)
        return 2
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(home))
    from dagster import DagsterInstance

    from assets.common import experiments_partitions

    with DagsterInstance.get() as instance:
        known = instance.has_dynamic_partition(experiments_partitions.name, name)
        if not (known or artifacts.exists() or spec_file.exists()):
            print(f"delete: no experiment {name!r} in {home}", file=sys.stderr)
            return 2
        if not args.yes:
            print(f"would delete: {artifacts}{' (absent)' if not artifacts.exists() else ''}; the rows of "
                  f"{name!r} in {db}; partition {name!r}" + (f"; {spec_file}" if spec_file.exists() else "")
                  + "\n  pass --yes to delete them", file=sys.stderr)
            return 1
        counts = {}
        if db.exists():
            from ops.warehouse import delete_experiment, writing

            with writing(db) as conn:
                counts = delete_experiment(conn, name)
        if artifacts.exists():
            shutil.rmtree(artifacts)
        shutil.rmtree(home / "artifacts" / ".pins" / name, ignore_errors=True)     # its pinned specs
        if (mirror := _store_resource(home).mirror()) is not None:                  # and on the shared store
            mirror.delete(f"{name}/")
            mirror.delete(f".pins/{name}/")
        if known:
            instance.delete_dynamic_partition(experiments_partitions.name, name)
        if spec_file.exists():
            spec_file.unlink()
    rows = sum(counts.values())
    print(f"deleted {name}: artifacts {artifacts}, {rows} warehouse rows, partition"
          + (f", {spec_file}" if args.spec else ""))
    return 0


def _first_failure(result) -> str | None:
    """The failed step and the innermost error's first line (the user's exception, not Dagster's
    wrapper around it): the one line that says what went wrong."""
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            while err is not None and err.cause is not None:
                err = err.cause
            line = (err.message.strip().splitlines() or [""])[0] if err is not None else ""
            return f"step {ev.step_key}: {line}"
    return None


def _report(home: Path, exp: str) -> str:
    from ops.report import experiment_report
    from ops.warehouse import reader

    with reader(home / "warehouse.duckdb") as conn:
        return experiment_report(conn, exp)


def cmd_report(args) -> int:
    try:
        print(_report(_home(), args.experiment))
    except Exception as e:  # KeyError for an unknown experiment, duckdb's IOException for no warehouse
        print(f"no report for {args.experiment!r}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_sql(args) -> int:
    """A query on the warehouse's last completed snapshot, in a sandbox: read-only, and no file,
    database, extension or setting outside it can be touched (ops.warehouse.SANDBOX)."""
    import duckdb

    from ops.warehouse import reader

    db = _home() / "warehouse.duckdb"
    if args.format == "parquet" and not args.output:
        print("sql: --format parquet needs --output FILE", file=sys.stderr)
        return 2
    try:
        with reader(db, sandbox=True) as conn:
            rel = conn.sql(args.query)
            if rel is None:
                return 0
            if args.format == "table" and not args.output:
                rel.show(max_rows=args.max_rows, max_width=200)
            else:
                _export(rel.arrow(), args.format if args.format != "table" else "csv", args.output)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    except duckdb.Error as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _export(table, fmt: str, output: str | None) -> None:
    """A query's result written by this process, not by DuckDB (whose sandbox writes no file): to
    ``output`` (from the user's directory, atomically) or, for csv and json, to standard output."""
    import io
    import json
    import tempfile

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ops.spec import user_path

    if hasattr(table, "read_all"):          # a RecordBatchReader from newer DuckDB
        table = table.read_all()
    if fmt == "json":
        data = (json.dumps(table.to_pylist(), default=str, indent=1) + "\n").encode()
    elif fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        data = buf.getvalue()
    if not output:
        sys.stdout.write(data.decode())
        return
    dest = user_path(output)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            Path(tmp).write_bytes(data)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {table.num_rows} rows to {dest}", file=sys.stderr)


def cmd_score(args) -> int:
    """Score new query examples against a finished experiment (ops/newdata.py): no model is
    retrained and no training feature recomputed; the batch lands in the warehouse's ``queries``
    and ``query_attributions`` tables, and each query's top supporting training examples print."""
    from ops.mirror import MirrorError
    from ops.newdata import QueryError, read_queries, score_queries
    from ops.spec import SpecError, load_spec_file, user_path
    from ops.store import ArtifactError, ArtifactStore
    from ops.warehouse import load_query_batch, writing
    from resources import DeviceError, resolve_device

    home = _home()
    try:
        spec = load_spec_file(_resolve_spec(args.experiment))
        device = resolve_device(args.device or os.environ.get("PROVENANCE_DEVICE", "auto"))
        store = ArtifactStore(home / "artifacts")
        if (mirror := _store_resource(home).mirror()) is not None:    # the shared store's current artifacts
            mirror.pull(f"{spec.name}/")
        queries = read_queries(spec, store, spec.name, user_path(args.path))
        out = score_queries(spec, store, spec.name, queries, device,
                            log=lambda m: print(m, file=sys.stderr) if args.verbose else None)
    except (SpecError, DeviceError, QueryError, ArtifactError, MirrorError) as e:
        print(e, file=sys.stderr)
        return 2
    with writing(home / "warehouse.duckdb") as conn:
        load_query_batch(conn, spec.name, out["batch"], out["queries_table"], out["top"])
    top, rows = out["top"], out["queries_table"]
    print(f"{spec.name}: scored {out['queries']} queries (batch {out['batch']}) in {out['seconds']:.1f}s with "
          f"{', '.join(out['methods'])}; warehouse tables queries, query_attributions (top TRAK support below)")
    import polars as pl

    for r in rows.iter_rows(named=True):
        print(f"\n{r['query_id']}  [{r['class_name']}, {r['label_source']}; margin {r['margin_full']:+.2f}]")
        mine = top.filter((pl.col("query_index") == r["query_index"]) & (pl.col("method") == "trak"))
        for t in mine.head(args.top).iter_rows(named=True):
            print(f"  {t['rank']:>3}. {t['train_id']:<28} score {t['score']:+.4g}")
    return 0


def cmd_home(args) -> int:
    """Prints the Dagster home (creating it), for ./provenance ui; runs left as started by a
    ./provenance run whose process is gone are marked failed first."""
    d = ensure_dagster_home(_home())
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(d))
    try:
        for run_id in fail_dead_runs(instance):
            print(f"run {run_id} was left as started by a process that is gone: marked failed", file=sys.stderr)
    finally:
        instance.dispose()
    print(d)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="provenance", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole lineage of an experiment and print its report")
    r.add_argument("spec", help="experiment name (experiments/<name>.yaml) or path to a spec")
    r.add_argument("--device", help="auto | cpu | cuda (default: $PROVENANCE_DEVICE or auto)")
    r.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.add_argument("--study", help="run only this study of the spec (and what it reads), not the core lineage")
    r.add_argument("--stale", action="store_true",
                   help="materialize only what is stale or missing (and what is downstream of it)")
    r.set_defaults(fn=cmd_run)
    st = sub.add_parser("stale", help="observe an experiment's spec and dataset and list its stale assets")
    st.add_argument("experiment", help="experiment name or spec path")
    st.set_defaults(fn=cmd_stale)
    d = sub.add_parser("delete", help="delete an experiment's artifacts, warehouse rows and partition")
    d.add_argument("experiment", help="experiment name")
    d.add_argument("--spec", action="store_true", help="delete experiments/<name>.yaml too")
    d.add_argument("--yes", action="store_true", help="do it (without: print what would be deleted)")
    d.set_defaults(fn=cmd_delete)
    v = sub.add_parser("validate", help="check a spec (and its dataset's labels) without running it")
    v.add_argument("spec")
    v.set_defaults(fn=cmd_validate)
    rep = sub.add_parser("report", help="print the report of a materialized experiment")
    rep.add_argument("experiment")
    rep.set_defaults(fn=cmd_report)
    s = sub.add_parser("sql", help="run a SQL query against the warehouse (read-only)")
    s.add_argument("query")
    s.add_argument("--max-rows", type=int, default=40, help="rows shown in the table format")
    s.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="table (shown), or csv/json/parquet (to --output, or csv/json to standard output)")
    s.add_argument("--output", help="write the result to this file (from your directory)")
    s.set_defaults(fn=cmd_sql)
    sc = sub.add_parser("score", help="attribute new query examples (image files or Parquet) to the training "
                                      "data of a finished experiment, without retraining")
    sc.add_argument("experiment", help="experiment name or spec path")
    sc.add_argument("path", help="an image file, a Parquet table, or a folder of them (class subfolders label them)")
    sc.add_argument("--top", type=int, default=5, help="training examples printed per query")
    sc.add_argument("--device", help="auto | cpu | cuda (default: $PROVENANCE_DEVICE or auto)")
    sc.add_argument("--verbose", action="store_true")
    sc.set_defaults(fn=cmd_score)
    h = sub.add_parser("dagster-home", help="print (and create) the Dagster instance folder")
    h.set_defaults(fn=cmd_home)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
