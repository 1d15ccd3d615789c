"""Studies: asset groups beyond the core lineage, each run only for specs that name it.

A study is registered here by its spec section and its asset group (docs/studies.md).  The
sensor, the schedule and ``./provenance run`` select the core lineage plus the studies a spec
names; everything else about a study lives in its own modules.
"""
from dagster import AssetKey, AssetSelection

from assets.photoguard import ASSETS as PHOTOGUARD_ASSETS
from assets.photoguard import GROUP as PHOTOGUARD_GROUP
from assets.photoguard import photoguard_job
from assets.regimes import ASSETS as REGIMES_ASSETS
from assets.regimes import GROUP as REGIMES_GROUP
from assets.regimes import regimes_job
from assets.robustness import ASSETS as ROBUSTNESS_ASSETS
from assets.robustness import GROUP as ROBUSTNESS_GROUP
from assets.robustness import robustness_job
from assets.smallify import ASSETS as SMALLIFY_ASSETS
from assets.smallify import GROUP as SMALLIFY_GROUP
from assets.smallify import smallify_job
from assets.threedb import ASSETS as THREEDB_ASSETS
from assets.threedb import GROUP as THREEDB_GROUP
from assets.threedb import threedb_job

# spec section -> (asset group, its assets, its job)
STUDIES = {
    "robustness": (ROBUSTNESS_GROUP, ROBUSTNESS_ASSETS, robustness_job),
    "regimes": (REGIMES_GROUP, REGIMES_ASSETS, regimes_job),
    "smallify": (SMALLIFY_GROUP, SMALLIFY_ASSETS, smallify_job),
    "threedb": (THREEDB_GROUP, THREEDB_ASSETS, threedb_job),
    "photoguard": (PHOTOGUARD_GROUP, PHOTOGUARD_ASSETS, photoguard_job),
}
STUDY_ASSETS = [a for _, assets, _ in STUDIES.values() for a in assets]
STUDY_JOBS = [job for _, _, job in STUDIES.values()]


def study_keys(names=None) -> set[AssetKey]:
    """The asset keys of the studies ``names`` (all of them by default)."""
    return {k for name, (_, assets, _) in STUDIES.items() if names is None or name in names
            for a in assets for k in a.keys}


def named(spec) -> list[str]:
    return [name for name in STUDIES if getattr(spec, name, None) is not None]


def unnamed_keys(spec) -> set[AssetKey]:
    """Assets of the studies the spec does not name: never to be selected for it."""
    return study_keys() - study_keys(named(spec))


def selection_for(spec) -> AssetSelection:
    """The core lineage and the studies ``spec`` names."""
    excluded = unnamed_keys(spec)
    return AssetSelection.all() - AssetSelection.assets(*excluded) if excluded else AssetSelection.all()
