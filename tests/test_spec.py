import pytest
import yaml

from ops.spec import SpecError, load_spec_file, parse_spec, validate_against_data


def _write(tmp_path, name, body):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def test_demo_spec_is_valid():
    from pathlib import Path

    spec = load_spec_file(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")
    counts = validate_against_data(spec)
    assert spec.name == "demo" and spec.attack.kind == "badnets" and sum(counts.values()) > 1000


@pytest.mark.parametrize("body, key, words", [
    ({"subsets": {"alpah": 0.5}}, "subsets.alpah", "unknown key"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"subsets": {"alpha": 1.5}}, "subsets.alpha", "must be in (0, 1)"),
    ({"subsets": {"alpha": 0}}, "subsets.alpha", "must be in (0, 1)"),
    ({"subsets": {"num_models": "many"}}, "subsets.num_models", "integer"),
    ({"training": {"epochs": 0}}, "training.epochs", "greater than 0"),
    ({"dataset": {"source": "imagenet"}}, "dataset.source", "digits"),
    ({"dataset": {"source": "image_folder"}}, "dataset.path", "required"),
    ({"attack": {"kind": "badnets"}}, "attack.poison_count", "must be > 0"),
    ({"trak": {"num_models": 500}}, "trak.num_models", "exceeds subsets.num_models"),
    ({"training": {"amp": "sometimes"}}, "training.amp", "auto"),
    ({"training": {"save_epochs": [10]}, "trak": {"checkpoint_epochs": [10, 20]}}, "trak.checkpoint_epochs",
     "[20] not in training.save_epochs"),
    ({"model": {"arch": "torchvision.resnet81"}}, "model.arch", "did you mean resnet18"),
    ({"detector": {"input": "datamodels", "prepare": "divide_q_test_center"}}, "detector.prepare",
     "needs TRAK's gradient features"),
    ({"detector": {"input": "datamodels", "prepare": "clean_whiten"}}, "detector.prepare",
     "needs TRAK's gradient features"),
    ({"detector": {"search": "everywhere"}}, "detector.search", "per_label"),
    ({"trak": {"proj_dim": "auto", "projector": "factored"}}, "trak.proj_dim", "auto needs projector: dense"),
    ({"trak": {"proj_dim": 0}}, "trak.proj_dim", "a positive integer or 'auto'"),
    ({"trak": {"proj_dim": 2.5}}, "trak.proj_dim", "a positive integer or 'auto'"),
    ({"trak": {"lam": "big"}}, "trak.lam", "auto"),
    ({"trak": {"proj_dim_grid": [64, 64]}}, "trak.proj_dim_grid", "distinct positive"),
    ({"trak": {"projector": "sparse"}}, "trak.projector", "factored"),
])
def test_bad_specs_are_refused_naming_the_key(tmp_path, body, key, words):
    p = _write(tmp_path, "bad", body)
    with pytest.raises(SpecError) as e:
        load_spec_file(p)
    msg = str(e.value)
    assert f"{p}: {key}:" in msg and words in msg


def test_poison_count_larger_than_its_class(tmp_path):
    spec = load_spec_file(_write(tmp_path, "p", {"attack": {"kind": "badnets", "source_class": 3,
                                                            "poison_count": 500}}))
    with pytest.raises(SpecError, match=r"attack.poison_count: 500 .* source class 3 has only \d+"):
        validate_against_data(spec, "p.yaml")
    spec = load_spec_file(_write(tmp_path, "q", {"attack": {"kind": "badnets", "target_class": 12,
                                                            "poison_count": 5}}))
    with pytest.raises(SpecError, match="attack.target_class: class 12 does not exist"):
        validate_against_data(spec, "q.yaml")


def test_missing_dataset(tmp_path):
    spec = load_spec_file(_write(tmp_path, "m", {"dataset": {"source": "fashion_mnist",
                                                             "path": str(tmp_path / "nowhere")}}))
    with pytest.raises(SpecError, match="dataset.path: .*nowhere does not exist"):
        validate_against_data(spec, "m.yaml")
    spec = load_spec_file(_write(tmp_path, "f", {"dataset": {"source": "image_folder",
                                                             "path": str(tmp_path / "nope")}}))
    with pytest.raises(SpecError, match="dataset.path: .* is not a folder"):
        validate_against_data(spec, "f.yaml")


def test_name_must_match_file_and_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="name: 'other' must match the file name 'x'"):
        load_spec_file(_write(tmp_path, "x", {"name": "other"}))
    p = tmp_path / "y.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec_file(p)
    with pytest.raises(SpecError, match="name: must be"):
        parse_spec({"name": "has space"})


def test_digest_changes_with_content():
    a = parse_spec({"name": "a"})
    assert a.digest() == parse_spec({"name": "a"}).digest()
    assert a.digest() != parse_spec({"name": "a", "seed": 1}).digest()


def test_datamodels_input_defaults_to_double_centring():
    spec = parse_spec({"name": "x", "detector": {"input": "datamodels"}})
    assert spec.detector.prepare == "divide_q_double_center"
    assert parse_spec({"name": "x"}).detector.prepare == "clean_whiten"
