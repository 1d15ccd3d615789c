import yaml
from dagster import build_sensor_context, instance_for_test

from assets import experiment_specs_sensor
from resources import ExperimentsResource


def test_sensor_adds_partitions_for_valid_specs_only(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"seed": 1}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"subsets": {"alpha": 2.0}}))
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"attack": {"kind": "badnets", "poison_count": 10**6}}))
    res = {"experiments": ExperimentsResource(directory=str(tmp_path))}
    with instance_for_test() as instance:
        r1 = experiment_specs_sensor(build_sensor_context(instance=instance, resources=res))
        assert [req.partitions_def_name for req in r1.dynamic_partitions_requests] == ["experiments"]
        assert list(r1.dynamic_partitions_requests[0].partition_keys) == ["a"]
        assert [(r.partition_key, r.run_key.split(":")[0]) for r in r1.run_requests] == [("a", "a")]
        instance.add_dynamic_partitions("experiments", ["a"])

        # same specs, advanced cursor: nothing new
        r2 = experiment_specs_sensor(build_sensor_context(instance=instance, cursor=r1.cursor, resources=res))
        assert not r2.run_requests and not r2.dynamic_partitions_requests

        # a changed spec re-runs its partition; a fixed one becomes a new partition
        (tmp_path / "a.yaml").write_text(yaml.safe_dump({"seed": 2}))
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"subsets": {"alpha": 0.4}}))
        r3 = experiment_specs_sensor(build_sensor_context(instance=instance, cursor=r2.cursor, resources=res))
        assert sorted(r.partition_key for r in r3.run_requests) == ["a", "bad"]
        assert list(r3.dynamic_partitions_requests[0].partition_keys) == ["bad"]
        assert r3.run_requests[0].run_key != r1.run_requests[0].run_key
