"""The specs sensor with build_sensor_context: partitions for valid specs, a run for what a change
makes stale (and only that), observations of the changed sources, run keys that let a revert and a
retry through, and deleted specs that keep their partition."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from dagster import DagsterRunStatus, build_sensor_context, instance_for_test
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from assets import experiment_specs_sensor
from assets.sources import SOURCE_KEYS, record, recorded_versions
from ops.spec import SPEC_TAG, load_pinned
from resources import ArtifactStoreResource, ExperimentsResource


def _resources(tmp_path):
    return {"experiments": ExperimentsResource(directory=str(tmp_path / "exp")),
            "store": ArtifactStoreResource(root=str(tmp_path / "artifacts"))}


def _tick(instance, res, cursor=None, apply=True):
    """One evaluation; with ``apply``, what the daemon does with its result (partitions added,
    observations recorded)."""
    with build_sensor_context(instance=instance, resources=res, cursor=cursor) as ctx:
        r = experiment_specs_sensor(ctx)
    if apply:
        for req in r.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        for ev in r.asset_events or []:
            instance.report_runless_asset_event(ev)
    return r


def _selection(req):
    return None if req.asset_selection is None else sorted(k.to_user_string() for k in req.asset_selection)


def test_sensor_adds_partitions_for_valid_specs_only(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "a.yaml").write_text(yaml.safe_dump({"seed": 1}))
    (d / "bad.yaml").write_text(yaml.safe_dump({"subsets": {"alpha": 2.0}}))
    (d / "big.yaml").write_text(yaml.safe_dump({"attack": {"kind": "badnets", "poison_count": 10**6}}))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        r1 = _tick(instance, res)
        assert [req.partitions_def_name for req in r1.dynamic_partitions_requests] == ["experiments"]
        assert list(r1.dynamic_partitions_requests[0].partition_keys) == ["a"]
        [req] = r1.run_requests
        assert req.partition_key == "a" and req.run_key.startswith("a:")
        assert len(_selection(req)) == 14 and "robust_models" not in _selection(req)   # the core, no study
        assert load_pinned("a", req.tags[SPEC_TAG], tmp_path / "artifacts").seed == 1       # the spec is pinned

        # same specs, advanced cursor: nothing new, and the skip reason names the refused files
        r2 = _tick(instance, res, r1.cursor)
        assert not r2.run_requests and not r2.dynamic_partitions_requests
        reason = r2.skip_reason.skip_message
        assert "refused bad.yaml: " in reason and "subsets.alpha" in reason and "refused big.yaml: " in reason

        # a changed spec re-runs its partition; a fixed one becomes a new partition
        (d / "a.yaml").write_text(yaml.safe_dump({"seed": 2}))
        (d / "bad.yaml").write_text(yaml.safe_dump({"subsets": {"alpha": 0.4}}))
        r3 = _tick(instance, res, r2.cursor)
        assert sorted(r.partition_key for r in r3.run_requests) == ["a", "bad"]
        assert list(r3.dynamic_partitions_requests[0].partition_keys) == ["bad"]
        assert r3.run_requests[0].run_key != r1.run_requests[0].run_key


def test_an_edit_runs_only_what_it_affects_and_a_revert_runs_again(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    spec = {"seed": 1, "detector": {"restarts": 16}, "trak": {"proj_dim": 64}}
    (d / "e.yaml").write_text(yaml.safe_dump(spec))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        first = _tick(instance, res)
        assert set(recorded_versions(instance, "e")) == set(SOURCE_KEYS)    # every source observed

        (d / "e.yaml").write_text(yaml.safe_dump({**spec, "detector": {"restarts": 8}}))
        edit = _tick(instance, res, first.cursor)
        [req] = edit.run_requests
        assert _selection(req) == ["backdoor_report", "warehouse"]
        assert [ev.asset_key.to_user_string() for ev in edit.asset_events] == ["spec/detector"]
        assert "spec/detector" in req.tags["provenance/reason"]

        (d / "e.yaml").write_text(yaml.safe_dump({**spec, "trak": {"proj_dim": 32}}))   # revert + trak edit
        both = _tick(instance, res, edit.cursor)
        [req2] = both.run_requests
        assert _selection(req2) == ["attribution_scores", "backdoor_report", "baseline_attributions",
                                    "gradient_features", "lds_evaluation", "warehouse"]

        (d / "e.yaml").write_text(yaml.safe_dump(spec))       # back to the first version: a run again
        revert = _tick(instance, res, both.cursor)
        [req3] = revert.run_requests
        assert req3.tags[SPEC_TAG] == first.run_requests[0].tags[SPEC_TAG]     # the same spec...
        assert req3.run_key != first.run_requests[0].run_key                 # ...but a new run key
        assert len({req.run_key, req2.run_key, req3.run_key, first.run_requests[0].run_key}) == 4


def test_a_failed_run_is_retried_when_its_spec_is_saved_again(tmp_path):
    import os

    from dagster._core.test_utils import create_run_for_test

    d = tmp_path / "exp"
    d.mkdir()
    (d / "e.yaml").write_text(yaml.safe_dump({"seed": 1}))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        first = _tick(instance, res)
        (d / "e.yaml").write_text(yaml.safe_dump({"seed": 1, "lds": {"bootstrap": 50}}))
        edit = _tick(instance, res, first.cursor)
        [req] = edit.run_requests
        create_run_for_test(instance, job_name="lineage_job", status=DagsterRunStatus.FAILURE,
                            tags=dict(req.tags), asset_selection=frozenset(req.asset_selection))
        assert not _tick(instance, res, edit.cursor).run_requests        # a failure alone is not retried
        st = os.stat(d / "e.yaml")
        os.utime(d / "e.yaml", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # touch
        retry = _tick(instance, res, edit.cursor)
        [again] = retry.run_requests
        assert _selection(again) == _selection(req) == ["lds_evaluation", "warehouse"]
        assert again.run_key != req.run_key and "retry of failed run" in again.tags["provenance/reason"]
        assert not _tick(instance, res, retry.cursor).run_requests       # once


def test_new_rows_in_the_dataset_rerun_the_lineage_from_raw_dataset(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    rng = np.random.default_rng(0)

    def write(n):
        from io import BytesIO

        from PIL import Image

        blobs = []
        for i in range(n):
            buf = BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(n)]}), tmp_path / "data.parquet")

    (d / "broken.yaml").write_text(yaml.safe_dump({"dataset": {"source": "parquet",
                                                               "path": str(tmp_path / "broken.parquet")}}))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    write(40)
    (d / "p.yaml").write_text(yaml.safe_dump({"dataset": {"source": "parquet", "path": str(tmp_path / "data.parquet"),
                                                           "channels": 1}}))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        first = _tick(instance, res)
        quiet = _tick(instance, res, first.cursor)
        assert not quiet.run_requests
        assert "refused broken.yaml: " in quiet.skip_reason.skip_message \
            and "broken.parquet" in quiet.skip_reason.skip_message            # the bad data file, named
        was = recorded_versions(instance, "p")["dataset_source"]
        write(44)                                             # four new rows
        grown = _tick(instance, res, first.cursor)
        [req] = grown.run_requests
        assert "raw_dataset" in _selection(req) and "checkpoints" in _selection(req) and len(_selection(req)) == 14
        assert [ev.asset_key.to_user_string() for ev in grown.asset_events] == ["dataset_source"]
        assert grown.asset_events[0].tags[DATA_VERSION_TAG] == recorded_versions(instance, "p")["dataset_source"] != was


def test_a_deleted_spec_keeps_its_partition_and_a_known_experiment_is_not_rerun(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "e.yaml").write_text(yaml.safe_dump({"seed": 3}))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        first = _tick(instance, res)
        (d / "e.yaml").unlink()
        gone = _tick(instance, res, first.cursor)
        assert not gone.run_requests and not gone.dynamic_partitions_requests
        assert instance.get_dynamic_partitions("experiments") == ["e"]

        # ./provenance run recorded the sources it read: a sensor turned on afterwards (no cursor)
        # has nothing to run for it
        (d / "e.yaml").write_text(yaml.safe_dump({"seed": 3}))
        from ops.spec import load_spec_file
        from ops.versions import versions

        record(instance, "e", versions(load_spec_file(d / "e.yaml")))
        assert not _tick(instance, res, None).run_requests


def test_the_stale_schedule_runs_what_dagster_finds_stale_and_waits_for_runs_in_flight(tmp_path):
    from dagster import SkipReason, build_schedule_context
    from dagster._core.test_utils import create_run_for_test

    from assets import stale_experiments_schedule

    d = tmp_path / "exp"
    d.mkdir()
    (d / "e.yaml").write_text(yaml.safe_dump({"seed": 1}))
    (d / "new.yaml").write_text(yaml.safe_dump({"seed": 2}))
    res = _resources(tmp_path)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["e"])
        with build_schedule_context(instance=instance, resources=res) as ctx:
            [req] = stale_experiments_schedule(ctx)
        assert req.partition_key == "e" and len(_selection(req)) == 14       # never materialized: all of it
        assert set(recorded_versions(instance, "e")) == set(SOURCE_KEYS)     # observed first
        assert load_pinned("e", req.tags[SPEC_TAG], tmp_path / "artifacts").seed == 1
        create_run_for_test(instance, job_name="lineage_job", status=DagsterRunStatus.STARTED,
                            tags={"provenance/experiment": "e"})
        with build_schedule_context(instance=instance, resources=res) as ctx:
            out = stale_experiments_schedule(ctx)
        assert isinstance(out, SkipReason)                                  # e is in flight; new is the sensor's
