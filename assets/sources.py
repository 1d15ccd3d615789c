"""The lineage's sources: the dataset's files and the spec's sections, as observable source assets.

Their data versions are the digests of ops/versions.py.  Observations are recorded by the specs
sensor on every tick that finds a change, by ``./provenance run`` before it runs, and by
``observe_sources_job`` (launched from the UI for a partition); Dagster then shows as stale exactly the assets whose sources changed
since they were materialized (a ``detector`` edit: ``backdoor_report``; new rows in the dataset:
``raw_dataset``, and the rest of the lineage as it is re-materialized with new content).
"""
import warnings

from dagster import (AssetKey, AssetObservation, AssetSelection, AssetSpec, BetaWarning, DataVersion,
                     ObserveResult, define_asset_job, multi_observable_source_asset)
from dagster._core.definitions.data_version import DATA_VERSION_TAG   # the tag observations carry

from assets.common import experiments_partitions
from ops.versions import READERS, SECTIONS, SOURCE
from resources import ArtifactStoreResource, ExperimentsResource

GROUP = "sources"
SOURCE_KEYS: dict[str, AssetKey] = {name: AssetKey(name.split("/")) for name in READERS}
_DESCRIBE = {SOURCE: "The files behind the experiment's dataset (digest of their names and bytes)."}
_DESCRIBE.update({f"spec/{s}": f"The spec's {', '.join(f'`{f}`' for f in fields)} (digest of the section)."
                  for s, fields in SECTIONS.items()})


def source_deps(*names: str) -> list[AssetKey]:
    return [SOURCE_KEYS[n] for n in names]


def digest_cache(store: ArtifactStoreResource):
    return store.get().root / ".cache" / "file_digests.json"


def _observe(context, experiments: ExperimentsResource, store: ArtifactStoreResource):
    from ops.versions import versions

    spec = experiments.current(context.partition_key)
    for name, digest in versions(spec, digest_cache(store)).items():
        yield ObserveResult(asset_key=SOURCE_KEYS[name], data_version=DataVersion(digest))


with warnings.catch_warnings():     # multi_observable_source_asset is a beta API in Dagster 1.13
    warnings.simplefilter("ignore", BetaWarning)
    experiment_sources = multi_observable_source_asset(
        specs=[AssetSpec(key, group_name=GROUP, description=_DESCRIBE[name]) for name, key in SOURCE_KEYS.items()],
        partitions_def=experiments_partitions, name="experiment_sources",
        description="Digests of what an experiment's results depend on: its dataset's files and its spec's "
                    "sections.")(_observe)


observe_sources_job = define_asset_job(
    "observe_sources_job", selection=AssetSelection.assets(*SOURCE_KEYS.values()),
    description="Observes one experiment's sources (its spec's sections, its dataset's files): what the specs "
                "sensor does on each tick, on demand.")


def recorded_versions(instance, exp: str) -> dict[str, str]:
    """The latest observed digest of each source of ``exp`` (absent: never observed)."""
    out = {}
    for name, key in SOURCE_KEYS.items():
        record = instance.get_latest_data_version_record(key, is_source=True, partition_key=exp)
        tags = record.asset_observation.tags if record and record.asset_observation else None
        if tags and DATA_VERSION_TAG in tags:
            out[name] = tags[DATA_VERSION_TAG]
    return out


def observations(exp: str, changed: dict[str, str]) -> list[AssetObservation]:
    return [AssetObservation(SOURCE_KEYS[name], partition=exp, tags={DATA_VERSION_TAG: digest},
                             metadata={"digest": digest})
            for name, digest in sorted(changed.items())]


def record(instance, exp: str, current: dict[str, str]) -> dict[str, str]:
    """Records the sources whose digest differs from the last observation; returns them."""
    before = recorded_versions(instance, exp)
    changed = {k: v for k, v in current.items() if before.get(k) != v}
    for event in observations(exp, changed):
        instance.report_runless_asset_event(event)
    return changed


_GRAPH = []


def _graph():
    if not _GRAPH:
        from dagster._core.definitions.assets.graph.asset_graph import AssetGraph

        from assets import ALL_ASSETS

        _GRAPH.append(AssetGraph.from_assets(ALL_ASSETS))
    return _GRAPH[0]


def affected_assets(changed: list[str] | set[str]) -> list[AssetKey]:
    """The assets that read a changed source, and everything downstream of them: what a run must
    materialize to bring the lineage up to date."""
    readers = sorted({READERS[name] for name in changed})
    if not readers:
        return []
    keys = AssetSelection.assets(*readers).downstream().resolve(_graph())
    return sorted(k for k in keys if k not in SOURCE_KEYS.values())


def _cause(c) -> str:
    dep = c.dependency or c.key
    dep = getattr(dep, "asset_key", dep)          # AssetKeyPartitionKey -> AssetKey
    return f"{c.reason}: {dep.to_user_string()}"


def stale_assets(instance, exp: str, exclude=frozenset()) -> dict[str, list[str]]:
    """Dagster's own view of the experiment, as the UI shows it: every asset that is stale (with
    its causes) or was never materialized.  Uses Dagster's stale-status resolver, which has no
    public API in 1.13 (the UI and the daemon use the same class)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    graph = _graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    out = {}
    for key in sorted(graph.materializable_asset_keys):
        if key in exclude:          # studies the spec does not name
            continue
        status = resolver.get_status(key, exp)
        if status == StaleStatus.MISSING:
            out[key.to_user_string()] = ["never materialized"]
        elif status == StaleStatus.STALE:
            out[key.to_user_string()] = sorted({_cause(c) for c in resolver.get_stale_causes(key, exp)})
    return out
