"""Backdoor report: every registered detector (strongest feature and the baselines), against poison_truth."""


from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext,
                     MaterializeResult, MetadataValue, asset)

from assets.common import code_version, experiments_partitions, metadata, png
from assets.sources import source_deps
from ops.tables import markdown
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)


@asset(deps=["attribution_scores", "poison_truth", "checkpoints", *source_deps("spec/detector")], partitions_def=experiments_partitions,
       group_name="backdoor", kinds={"numba", "parquet"},
       check_specs=[AssetCheckSpec("detector_flagged_something", asset="backdoor_report",
                                   description="The report's first detector (strongest feature by default) flagged at least one example.")],
       code_version=CODE_VERSION)
def backdoor_report(context: AssetExecutionContext, experiments: ExperimentsResource,
                    store: ArtifactStoreResource, compute: ComputeResource):
    """The strongest-feature detector and the registered baselines on the train x train scores:
    flagged examples, precision / recall / AUROC against poison_truth, and clean accuracy and attack
    success after retraining without the flagged set (and without the true poisons, as reference)."""
    from ops import backdoor

    key = context.partition_key
    s = store.get()
    summary = backdoor.backdoor_report(experiments.load(key), s, key, compute.torch_device(), context.log.info)
    table = s.load_table(key, backdoor.REPORT, "summary.parquet")
    md = metadata(summary, {"path": s.path(key, backdoor.REPORT)})
    md["summary"] = MetadataValue.md(markdown(table, drop=("experiment", "flag_rule")))
    grid = s.path(key, backdoor.REPORT, "top_flagged.png")
    md["top_flagged"] = png(grid, f"Top-ranked training images of `{summary['grid_method']}` with their training "
                                  f"labels (red frame: truly poisoned)", alt="top flagged")
    md["top_flagged_path"] = MetadataValue.path(str(grid))
    plot = backdoor.plot_scores(s.load_table(key, backdoor.REPORT, "scores.parquet"),
                                s.path(key, backdoor.REPORT, "scores.png"), summary["grid_method"])
    md["scores_and_roc"] = png(plot, f"Score histogram of `{summary['grid_method']}` and every detector's ROC "
                                     f"curve", alt="scores")
    yield MaterializeResult(metadata=md)
    yield AssetCheckResult(check_name="detector_flagged_something", passed=summary["flagged"] > 0,
                           severity=AssetCheckSeverity.WARN, metadata={"flagged": summary["flagged"]})
