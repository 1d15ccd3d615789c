"""New query examples through Dagster: an inbox per experiment, a sensor that picks up each new
file once, and a job that scores it (ops/newdata.py) without retraining anything.

The inbox is ``<artifact store>/<experiment>/inbox/`` unless the spec's ``inbox`` key points
elsewhere.  The sensor's cursor remembers every (experiment, file name, content digest) it has
handled: the same file is not scored twice, an edited file is scored again.  A file that cannot be
read as the experiment's examples is skipped with a reason naming it (and not retried until it
changes); an experiment whose attribution is not finished yet is left for a later tick.
"""

import hashlib
import json
from pathlib import Path

from dagster import (Config, DefaultSensorStatus, OpExecutionContext, RunRequest, SensorEvaluationContext,
                     SensorResult, SkipReason, job, op, sensor)
from dagster_duckdb import DuckDBResource

from assets.common import SENSOR_INTERVAL, experiments_partitions
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource


class ScoreFileConfig(Config):
    experiment: str
    path: str


@op(description="Scores one inbox file's query examples against the experiment's stored training features.")
def score_inbox_file(context: OpExecutionContext, config: ScoreFileConfig, experiments: ExperimentsResource,
                     store: ArtifactStoreResource, compute: ComputeResource, duckdb: DuckDBResource) -> dict:
    from ops.newdata import read_queries, score_queries
    from ops.warehouse import load_query_batch, writing

    spec = experiments.load(config.experiment)
    queries = read_queries(spec, store.get(), config.experiment, config.path)
    out = score_queries(spec, store.get(), config.experiment, queries, compute.torch_device(), context.log.info)
    with writing(Path(duckdb.database)) as conn:
        counts = load_query_batch(conn, config.experiment, out["batch"], out["queries_table"], out["top"])
    context.log.info(f"{config.path}: {out['queries']} queries scored, batch {out['batch']}: {counts}")
    return {"batch": out["batch"], "queries": out["queries"], "seconds": out["seconds"]}


@job(description="Scores new query examples (one inbox file) against a finished experiment.")
def score_queries_job():
    score_inbox_file()


def inbox_dir(spec, store, exp: str) -> Path:
    return Path(spec.inbox) if spec.inbox else store.path(exp, "inbox")


@sensor(job=score_queries_job, minimum_interval_seconds=SENSOR_INTERVAL, default_status=DefaultSensorStatus.STOPPED,
        description="Scores every new file in an experiment's inbox (image files or Parquet tables), once.")
def inbox_sensor(context: SensorEvaluationContext, experiments: ExperimentsResource, store: ArtifactStoreResource):
    from ops.newdata import QueryError, read_queries
    from ops.sources import IMAGE_SUFFIXES
    from ops.spec import SpecError

    seen = set(json.loads(context.cursor)) if context.cursor else set()
    runs, skipped = [], []
    s = store.get()
    for exp in sorted(context.instance.get_dynamic_partitions(experiments_partitions.name)):
        try:
            spec = experiments.load(exp)
        except SpecError:
            continue                                  # the specs sensor reports refused specs
        folder = inbox_dir(spec, s, exp)
        if not folder.is_dir():
            continue
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                       and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix.lower() == ".parquet"))
        if files and not s.path(exp, "attribution_scores", "train_features.npy").exists():
            skipped.append(f"{exp}: attribution is not finished yet; its inbox waits")
            continue
        for f in files:
            key = f"{exp}:{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}"
            if key in seen:
                continue
            seen.add(key)
            try:
                read_queries(spec, s, exp, f)         # readable as the experiment's examples?
            except QueryError as e:
                skipped.append(f"skipped {e}")
                continue
            runs.append(RunRequest(run_key=key, tags={"experiment": exp, "inbox_file": f.name},
                                   run_config={"ops": {"score_inbox_file": {"config": {"experiment": exp,
                                                                                       "path": str(f)}}}}))
    for msg in skipped:
        context.log.warning(msg)
    cursor = json.dumps(sorted(seen))
    if not runs:
        return SensorResult(skip_reason=SkipReason("; ".join(skipped)) if skipped else None, cursor=cursor)
    return SensorResult(run_requests=runs, cursor=cursor)
