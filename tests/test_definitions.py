import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, Definitions

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load_with_the_whole_lineage():
    from definitions import defs

    Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {"raw_dataset", "training_set", "poison_truth", "loader_files", "subset_masks", "checkpoints",
                    "model_outputs", "gradient_features", "attribution_scores", "datamodel_weights",
                    "baseline_attributions", "lds_evaluation", "backdoor_report", "warehouse",
                    # the sources every stage depends on (assets/sources.py)
                    "dataset_source", "spec/dataset", "spec/attack", "spec/subsets", "spec/training", "spec/trak",
                    "spec/datamodels", "spec/lds", "spec/detector", "spec/other", "spec/robustness",
                    # the robustness study (assets/robustness.py)
                    "robust_models", "robustness_eval", "neural_response", "robustness_warehouse"}
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"lineage_job", "score_queries_job", "robustness_job"}
    study = defs.resolve_job_def("robustness_job")
    assert {k.to_user_string() for k in study.asset_layer.executable_asset_keys} == {
        "robust_models", "robustness_eval", "neural_response", "robustness_warehouse"}
    job = defs.resolve_job_def("lineage_job")
    assert job.partitions_def is not None and job.partitions_def.name == "experiments"
    graph = defs.resolve_asset_graph()
    assert AssetKey("gradient_features") in graph.get(AssetKey("attribution_scores")).parent_keys


def test_every_asset_has_a_description_owners_a_stage_tag_and_a_code_version():
    from definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assert node.description, name
        assert node.owners == ["team:provenance"], name
        assert node.tags.get("stage") == node.group_name, (name, node.tags)
        assert not node.is_materializable or node.code_version, name


def test_definitions_import_neither_torch_nor_numba():
    code = "import sys, definitions; print('torch' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_checking_a_spec_imports_neither_torch_nor_numba():
    """The sensor checks every spec on every tick: that must stay cheap."""
    code = ("import sys; from ops.spec import load_spec_file; load_spec_file('experiments/demo.yaml'); "
            "print('torch' in sys.modules, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_kernels_know_nothing_of_dagster():
    for p in (ROOT / "kernels").glob("*.py"):
        text = p.read_text()
        assert "import dagster" not in text and "from dagster" not in text, p
    for p in (ROOT / "ops").glob("*.py"):
        text = p.read_text()
        assert "from assets" not in text and "import dagster" not in text and "from dagster" not in text, p
