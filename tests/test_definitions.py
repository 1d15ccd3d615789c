import subprocess
import sys
from pathlib import Path

import pytest
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
                    "spec/datamodels", "spec/lds", "spec/detector", "spec/other", "spec/robustness", "spec/regimes",
                    "spec/smallify", "spec/threedb", "spec/photoguard",
                    # the robustness study (assets/robustness.py)
                    "robust_models", "robustness_eval", "neural_response", "robustness_warehouse",
                    # the two-regimes study (assets/regimes.py)
                    "regimes_runs", "regimes_warehouse",
                    # the Smallify study (assets/smallify.py)
                    "smallify_runs", "smallify_warehouse",
                    # the 3DB study (assets/threedb.py)
                    "threedb_model", "threedb_results", "threedb_warehouse",
                    # the PhotoGuard study (assets/photoguard.py)
                    "photoguard_models", "photoguard_immunize", "photoguard_edits", "photoguard_warehouse"}
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


def test_code_versions_follow_the_code_an_asset_calls(tmp_path, monkeypatch):
    """An edit to a kernel the detector calls changes the backdoor report's code version and leaves
    the data stages' alone; an edit to the data ops changes the data stages'."""
    import shutil

    from assets import common

    for pkg in ("assets", "ops", "kernels"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(common, "_ROOT", tmp_path)

    def versions():
        common.code_version.cache_clear()
        common._imports.cache_clear()
        return {m: common.code_version(m) for m in ("assets.data", "assets.backdoor", "assets.attribution")}

    before = versions()
    assert len(set(before.values())) == 3
    with open(tmp_path / "kernels" / "spectral.py", "a") as f:   # ops.backdoor -> ops.detectors -> kernels.spectral
        f.write("\n# edited\n")
    after = versions()
    assert after["assets.backdoor"] != before["assets.backdoor"]
    assert after["assets.data"] == before["assets.data"]
    with open(tmp_path / "ops" / "data.py", "a") as f:
        f.write("\n# edited\n")
    again = versions()
    assert again["assets.data"] != after["assets.data"]
    common.code_version.cache_clear()
    common._imports.cache_clear()


def test_the_executor_is_chosen_by_environment_alone(monkeypatch):
    import definitions

    monkeypatch.setenv("PROVENANCE_EXECUTOR", "celery")
    assert definitions.executor().name == "celery"
    monkeypatch.setenv("PROVENANCE_EXECUTOR", "k8s")
    monkeypatch.setenv("PROVENANCE_STORE_URL", "s3://bucket/provenance")
    monkeypatch.setenv("PROVENANCE_K8S_NAMESPACE", "research")
    k8s = definitions.executor()
    assert k8s.name == "k8s"
    job = Definitions(assets=definitions.ALL_ASSETS, resources=definitions.make_resources(),
                      executor=k8s).resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    # the steps' Jobs get the shared store and the namespace from this process's environment
    config = definitions.k8s_config()
    assert config["job_namespace"] == "research"
    assert "PROVENANCE_STORE_URL=s3://bucket/provenance" in config["env_vars"]
    assert "PROVENANCE_EXECUTOR=k8s" in config["env_vars"]
    monkeypatch.setenv("PROVENANCE_EXECUTOR", "ray")
    with pytest.raises(ValueError, match="PROVENANCE_EXECUTOR: 'ray' is not one of"):
        definitions.executor()


def test_no_module_of_the_runtime_imports_pandas():
    """Tables are polars (issue 16): importing every ops, kernels and assets module loads no pandas."""
    code = ("import sys, pkgutil, importlib, definitions, cli\n"
            "for pkg in ('ops', 'ops.methods', 'kernels', 'assets', 'resources'):\n"
            "    m = importlib.import_module(pkg)\n"
            "    for info in pkgutil.iter_modules(m.__path__):\n"
            "        importlib.import_module(f'{pkg}.{info.name}')\n"
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
