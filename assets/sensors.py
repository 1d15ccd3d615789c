"""The lineage job, and the sensor that turns every valid spec in experiments/ into a partition."""

import json
from pathlib import Path

from dagster import (AssetSelection, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult,
                     define_asset_job, sensor)

from assets.common import experiments_partitions
from resources import ExperimentsResource

lineage_job = define_asset_job(
    "lineage_job", selection=AssetSelection.all(),
    description="Materializes the whole lineage for one experiment (partition).")


def scan_specs(directory: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Valid specs as {name: digest} and refused ones as {file: message}. Reads only labels."""
    from ops.spec import SpecError, load_spec_file, validate_against_data

    valid, refused = {}, {}
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            spec = load_spec_file(path)
            validate_against_data(spec, str(path))
        except SpecError as e:
            refused[path.name] = str(e)
            continue
        valid[spec.name] = spec.digest()
    return valid, refused


@sensor(job=lineage_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.STOPPED,
        description="Adds a partition for every valid spec in experiments/ and runs it when it is new or changed.")
def experiment_specs_sensor(context: SensorEvaluationContext, experiments: ExperimentsResource):
    seen = json.loads(context.cursor) if context.cursor else {}
    valid, refused = scan_specs(experiments.directory)
    for name, msg in refused.items():
        context.log.warning(f"refused {name}:\n{msg}")
    existing = set(context.instance.get_dynamic_partitions(experiments_partitions.name))
    new = sorted(set(valid) - existing)
    runs = [RunRequest(partition_key=name, run_key=f"{name}:{digest}")
            for name, digest in sorted(valid.items()) if seen.get(name) != digest]
    return SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[experiments_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps({**seen, **valid}, sort_keys=True))
