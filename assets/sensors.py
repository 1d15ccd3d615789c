"""The lineage job, and the sensor that turns every valid spec in experiments/ into a partition
and keeps each partition up to date with its spec and its dataset.

On every tick the sensor digests each valid spec's sections and its dataset's files
(ops/versions.py) and compares them with what it saw last (for an experiment it has not seen: with
the observations recorded on the instance, e.g. by ``./provenance run``).  A new spec gets a run of
the whole lineage; a changed one gets a run of the assets that read what changed and everything
downstream of them (a ``detector`` edit: ``backdoor_report`` and ``warehouse``), and the new digests
are recorded as observations of the source assets, so the UI shows those assets stale until the
run finishes.  Each request pins the spec it was made for (tag ``provenance/spec``).

Run keys are ``<name>:<spec digest>:<generation>``, the generation counting this experiment's
requests: reverting a spec to an earlier version is a change like any other and gets a run.  A run
that failed is requested again, with the same assets, when its spec file is saved again
(``touch experiments/<name>.yaml``), or re-executed from the UI.  A deleted spec's partition and
results stay (``./provenance delete`` removes them).
"""

import json
import os
from pathlib import Path

from dagster import (AssetSelection, DagsterRunStatus, DefaultScheduleStatus, DefaultSensorStatus, RunRequest,
                     RunsFilter, ScheduleEvaluationContext, SensorEvaluationContext, SensorResult, SkipReason,
                     define_asset_job, schedule, sensor)

from assets.common import SENSOR_INTERVAL, experiments_partitions
from resources import ArtifactStoreResource, ExperimentsResource

EXPERIMENT_TAG = "provenance/experiment"

lineage_job = define_asset_job(
    "lineage_job", selection=AssetSelection.all(),
    description="Materializes the whole lineage for one experiment (partition).")


def scan_specs(directory: str | Path) -> tuple[dict, dict[str, str]]:
    """Valid specs as {name: (spec, file)} and refused ones as {file: message}."""
    from ops.spec import SpecError, load_spec_file, validate_against_data

    valid, refused = {}, {}
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            spec = load_spec_file(path)
            validate_against_data(spec, str(path))
        except SpecError as e:
            refused[path.name] = str(e)
            continue
        valid[spec.name] = (spec, path)
    return valid, refused


def _failed_run_to_retry(instance, name: str):
    runs = instance.get_runs(RunsFilter(tags={EXPERIMENT_TAG: name}), limit=1)
    if runs and runs[0].status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        return runs[0]
    return None


@sensor(job=lineage_job, minimum_interval_seconds=SENSOR_INTERVAL, default_status=DefaultSensorStatus.STOPPED,
        description="Adds a partition for every valid spec in experiments/ and runs what a new or changed spec, "
                    "or changed dataset files, make stale.")
def experiment_specs_sensor(context: SensorEvaluationContext, experiments: ExperimentsResource,
                            store: ArtifactStoreResource):
    from assets.sources import _graph, affected_assets, digest_cache, observations, recorded_versions
    from assets.studies import selection_for, unnamed_keys
    from ops.spec import SPEC_TAG
    from ops.versions import versions

    seen = json.loads(context.cursor) if context.cursor else {}
    valid, refused = scan_specs(experiments.directory)
    for name, msg in refused.items():
        context.log.warning(f"refused {name}:\n{msg}")
    existing = set(context.instance.get_dynamic_partitions(experiments_partitions.name))
    runs, events, cursor = [], [], dict(seen)
    for name, (spec, path) in sorted(valid.items()):
        entry = seen.get(name) if isinstance(seen.get(name), dict) else None
        current = versions(spec, digest_cache(store))
        before = entry["v"] if entry else recorded_versions(context.instance, name)
        changed = {k: v for k, v in current.items() if before.get(k) != v}
        mtime = path.stat().st_mtime_ns
        gen = entry["gen"] if entry else 0
        if name not in existing:
            selection, why = sorted(selection_for(spec).resolve(_graph())), "new experiment"
        elif changed and (selection := sorted(set(affected_assets(changed)) - unnamed_keys(spec))):
            why = f"changed: {', '.join(sorted(changed))}"
        elif entry and mtime != entry.get("mtime") and (failed := _failed_run_to_retry(context.instance, name)):
            selection = sorted(failed.asset_selection) if failed.asset_selection else None
            why = f"retry of failed run {failed.run_id}"
        else:
            cursor[name] = {**(entry or {}), "v": current, "gen": gen, "mtime": mtime}
            continue
        gen += 1
        digest = store.pin(spec)
        context.log.info(f"{name}: {why} -> run {name}:{digest}:{gen}")
        runs.append(RunRequest(partition_key=name, run_key=f"{name}:{digest}:{gen}", asset_selection=selection,
                               tags={SPEC_TAG: digest, EXPERIMENT_TAG: name, "provenance/reason": why[:200]}))
        events += observations(name, changed)
        cursor[name] = {"v": current, "gen": gen, "mtime": mtime}
    new = sorted(set(valid) - existing)
    skip = None
    if not runs:     # say why nothing runs: a refused spec or dataset file is named, with its first error
        skip = SkipReason("; ".join(f"refused {f}: {msg.splitlines()[0]}" for f, msg in refused.items())
                          or "no spec or dataset changed")
    return SensorResult(
        run_requests=runs, asset_events=events, skip_reason=skip,
        dynamic_partitions_requests=[experiments_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(cursor, sort_keys=True))


def _in_flight(instance, name: str) -> bool:
    return bool(instance.get_runs(RunsFilter(tags={EXPERIMENT_TAG: name}, statuses=[
        DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
        DagsterRunStatus.STARTED]), limit=1))


@schedule(job=lineage_job, cron_schedule=os.environ.get("PROVENANCE_STALE_CRON", "0 * * * *"),
          default_status=DefaultScheduleStatus.STOPPED,
          description="Every hour: observes every experiment's spec and dataset, and runs whatever Dagster finds "
                      "stale or missing (with what is downstream of it); experiments with a run in flight wait.")
def stale_experiments_schedule(context: ScheduleEvaluationContext, experiments: ExperimentsResource,
                               store: ArtifactStoreResource):
    """The schedule-driven alternative to the specs sensor (either, or both): where the sensor
    reacts to changes it sees between ticks, this asks Dagster's stale status, so it also picks up
    a failed run's assets (retried once per tick) and experiments changed while nothing watched."""
    from dagster import AssetKey, AssetSelection

    from assets.sources import _graph, digest_cache, record, stale_assets
    from assets.studies import unnamed_keys
    from ops.spec import SPEC_TAG
    from ops.versions import versions

    valid, refused = scan_specs(experiments.directory)
    for name, msg in refused.items():
        context.log.warning(f"refused {name}:\n{msg}")
    known = set(context.instance.get_dynamic_partitions(experiments_partitions.name))
    runs = []
    for name, (spec, _) in sorted(valid.items()):
        if name not in known or _in_flight(context.instance, name):
            continue                          # new specs are the sensor's (it adds the partition)
        record(context.instance, name, versions(spec, digest_cache(store)))
        stale = stale_assets(context.instance, name, exclude=unnamed_keys(spec))
        if not stale:
            continue
        keys = AssetSelection.assets(*[AssetKey.from_user_string(k) for k in stale]).downstream().resolve(_graph())
        keys = set(keys) - unnamed_keys(spec)
        digest = store.pin(spec)
        runs.append(RunRequest(partition_key=name, asset_selection=sorted(keys),
                               tags={SPEC_TAG: digest, EXPERIMENT_TAG: name,
                                     "provenance/reason": f"stale: {', '.join(stale)}"[:200]}))
    return runs or SkipReason("nothing is stale")
