"""The asset graph of provenance; every asset is partitioned by experiment."""
from assets.attribution import (attribution_scores, baseline_attributions, datamodel_weights, gradient_features,
                                lds_evaluation)
from assets.backdoor import backdoor_report
from assets.common import experiments_partitions
from assets.data import loader_files, raw_dataset, subset_masks, training_set
from assets.inbox import inbox_sensor, score_queries_job
from assets.sensors import experiment_specs_sensor, lineage_job, stale_experiments_schedule
from assets.sources import experiment_sources, observe_sources_job
from assets.studies import STUDY_ASSETS, STUDY_JOBS
from assets.training import checkpoints, margins_finite, models_above_chance
from assets.warehouse import warehouse

ALL_ASSETS = [raw_dataset, training_set, loader_files, subset_masks, checkpoints, gradient_features,
              attribution_scores, baseline_attributions, datamodel_weights, lds_evaluation, backdoor_report, warehouse,
              experiment_sources, *STUDY_ASSETS]
ALL_CHECKS = [models_above_chance, margins_finite]

OWNERS = ["team:provenance"]


def _annotated(assets_def):
    """Owners and a ``stage`` tag (the asset's group) on every asset, as Dagster users expect to
    filter the catalog by them."""
    groups = assets_def.group_names_by_key
    return assets_def.map_asset_specs(lambda spec: spec.replace_attributes(
        owners=OWNERS, tags={**spec.tags, "stage": groups.get(spec.key, "default")}))


ALL_ASSETS = [_annotated(a) for a in ALL_ASSETS]

__all__ = ["ALL_ASSETS", "ALL_CHECKS", "experiments_partitions", "lineage_job", "experiment_specs_sensor",
           "inbox_sensor", "score_queries_job", "stale_experiments_schedule",
           "STUDY_JOBS", "observe_sources_job"]
