"""Baseline detectors and the detector's input preparations."""
import numpy as np
import pytest

from kernels.baselines import activation_clustering, que_scores, que_scores_reference, spectre_scores
from kernels.local_search import influence_matrix
from kernels.stats import recall_at_fpr


def _features(n=400, d=16, p=30, shift=6.0, seed=0):
    """Two classes of Gaussian features; class 0 holds p poisons shifted along one direction."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    labels = np.arange(n) % 2
    poison = np.zeros(n, bool)
    poison[np.flatnonzero(labels == 0)[:p]] = True
    x[poison, 0] += shift
    return x, labels, poison


def test_que_scores_match_the_matrix_exponential():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 5)) * np.array([3.0, 1, 1, 1, 1])
    np.testing.assert_allclose(que_scores(x), que_scores_reference(x), rtol=1e-8)


def test_spectre_and_activation_clustering_find_a_shifted_cluster():
    x, labels, poison = _features()
    s = spectre_scores(x, labels)
    assert recall_at_fpr(s, poison, 0.05) > 0.9
    scores, flags = activation_clustering(x, labels)
    assert recall_at_fpr(scores, poison, 0.05) > 0.9
    assert flags[poison].mean() > 0.9 and flags[~poison].mean() < 0.05
    # no structure: nothing is flagged by the clustering rule
    clean, labels2, _ = _features(p=0)
    assert activation_clustering(clean, labels2)[1].sum() == 0


def test_recall_at_fpr_counts_ties_against():
    truth = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    assert recall_at_fpr(np.r_[5.0, 4.0, np.zeros(8)], truth, 0.1) == 1.0
    assert recall_at_fpr(np.r_[5.0, 0.0, np.zeros(8)], truth, 0.1) == 0.5    # a tie with clean is not above
    assert recall_at_fpr(np.r_[5.0, 4.0, 6.0, np.zeros(7)], truth, 0.0) == 0.0   # a clean example outranks both


def test_influence_matrix_preparations():
    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) % 2
    tau = rng.standard_normal((n, n)) * rng.uniform(0.1, 10, (n, 1))       # rows of very different scale
    q = rng.uniform(0.1, 1, n)
    paper = influence_matrix(tau, q, labels, "paper")
    assert (np.diag(paper) == 0).all() and np.allclose(paper + np.diag(np.diag(tau)), tau)
    rs = influence_matrix(tau, q, labels, "row_scale")
    np.testing.assert_allclose((rs.astype(np.float64) ** 2).sum(1) / (n - 1), 1.0, rtol=1e-6)
    dq = influence_matrix(tau, q, labels, "divide_q_center")
    off = ~np.eye(n, dtype=bool)
    for a in (0, 1):
        for b in (0, 1):
            block = (labels[:, None] == a) & (labels[None, :] == b) & off
            assert abs(dq[block].mean()) < 1e-6            # float32 storage
    dc = influence_matrix(tau, q, labels, "divide_q_double_center")
    for a in (0, 1):
        for b in (0, 1):
            block = np.where((labels[:, None] == a) & (labels[None, :] == b) & off, dc, np.nan)
            rows = block[labels == a][:, labels == b]
            assert abs(np.nanmean(rows)) < 1e-6
            if a != b:   # rows and columns of a block without the diagonal centre exactly
                np.testing.assert_allclose(np.nanmean(rows, 1), 0, atol=1e-7 * np.abs(dc).max())
                np.testing.assert_allclose(np.nanmean(rows, 0), 0, atol=1e-7 * np.abs(dc).max())
    with pytest.raises(ValueError, match="n x n"):
        influence_matrix(tau[:, :5], q, labels)
    with pytest.raises(ValueError, match="unknown preparation"):
        influence_matrix(tau, q, labels, "sideways")


def test_double_centring_fast_matches_reference():
    from kernels.local_search import double_center_label_blocks, double_center_reference
    rng = np.random.default_rng(1)
    for n, c in ((7, 1), (50, 3), (201, 10)):
        labels = rng.integers(0, c, n)
        labels[:c] = np.arange(c)                          # every label present, one may be a singleton
        a = rng.standard_normal((n, n)) * rng.uniform(0.1, 5, (n, 1))
        np.testing.assert_allclose(double_center_label_blocks(a.copy(), labels),
                                   double_center_reference(a, labels), atol=1e-10)


def test_double_centring_removes_a_label_mean_and_keeps_a_planted_set():
    """Gram of features = label mean + noise + (a shared direction on a planted set of mixed content):
    after double centring the planted set is the densest block, although a natural sub-cluster of one
    label is closer in raw kernel value."""
    from kernels.local_search import double_center_label_blocks, strongest_feature_scores
    from kernels.stats import detection_metrics
    rng = np.random.default_rng(2)
    n, d = 400, 60
    labels = np.arange(n) % 4
    means = rng.standard_normal((4, d)) * 3
    x = means[labels] + rng.standard_normal((n, d))
    planted = np.zeros(n, bool)
    planted[rng.choice(np.flatnonzero(labels == 0), 30, replace=False)] = True
    x[planted] = means[rng.integers(1, 4, planted.sum())] + rng.standard_normal((planted.sum(), d))
    x[planted, 0] += 4.0                                   # the trigger: one shared direction
    sub = (labels == 1) & (np.arange(n) < 120)             # a natural sub-cluster, closer still
    x[sub, 1] += 6.0
    gram = x @ x.T
    raw = strongest_feature_scores(gram - np.diag(np.diag(gram)), sizes=[30], restarts=8, seed=0)
    dc = strongest_feature_scores(double_center_label_blocks(gram.copy(), labels), sizes=[30], restarts=8, seed=0)
    truth = planted
    assert detection_metrics(dc, np.zeros(n, bool), truth)["recall_at_budget"] >= 0.9
    assert detection_metrics(raw, np.zeros(n, bool), truth)["recall_at_budget"] < 0.5


def test_spec_preparations_match_the_kernel():
    """detector.prepare and detector.search accept exactly what the kernels implement (clean_whiten is
    built from the gradient features by kernels.trak, the others from TRAK's scores)."""
    import typing

    from kernels.local_search import PREPARATIONS, SEARCHES
    from ops.spec import DetectorSpec
    assert set(typing.get_args(DetectorSpec.model_fields["prepare"].annotation)) == {*PREPARATIONS, "clean_whiten"}
    assert set(typing.get_args(DetectorSpec.model_fields["search"].annotation)) == set(SEARCHES)


def test_every_spec_method_is_registered():
    """detector.methods accepts exactly the registered detectors (the two lists cannot drift)."""
    from ops.detectors import DETECTORS
    from ops.spec import DETECTOR_METHODS

    assert set(DETECTORS) == set(DETECTOR_METHODS)


def test_detector_centres_at_test_examples_through_the_real_stages(tmp_path, monkeypatch):
    """Digits with a BadNets patch, through the real stages: the default preparation (centred at each
    label's test mean, whitened by the test split) and the test-centred TRAK matrix both find the
    poisons, the default flags them with the test null beside the Otsu split; with too few test
    examples per label both fall back to double centring, and say so."""
    import torch

    from kernels.stats import detection_metrics
    from ops import attribution as A
    from ops import data as D
    from ops import training as T
    from ops.detectors import DETECTORS, Inputs
    from ops.spec import parse_spec
    from ops.store import ArtifactStore

    spec = parse_spec({"name": "tc", "seed": 2, "dataset": {"source": "digits", "limit_train": 400, "limit_test": 200},
                       "attack": {"kind": "badnets", "poison_count": 30, "patch_size": 3},
                       "model": {"arch": "mlp", "hidden": 32}, "training": {"epochs": 10, "batch_size": 32},
                       "subsets": {"num_models": 24, "num_heldout": 2}, "trak": {"num_models": 16, "proj_dim": 48},
                       "detector": {"restarts": 12}})
    store, exp, dev, log = ArtifactStore(tmp_path), "tc", torch.device("cpu"), []
    for stage in (D.raw_dataset, D.training_set, D.loader_files, D.subset_masks):
        stage(spec, store, exp)
    for jobs in T.plan_shards(spec, store, exp, log.append):
        T.train_shard(spec, store, exp, jobs, dev, log.append)
    T.collect_models(spec, store, exp, log.append)
    A.gradient_features(spec, store, exp, dev, log.append)
    A.attribution_scores(spec, store, exp, log.append)
    labels = np.asarray(store.load_npy(exp, "training_set", "train_labels.npy"))
    truth = np.asarray(store.load_npy(exp, "training_set", "poisoned.npy")) == 1

    def detect(**detector):
        s = parse_spec({**spec.model_dump(mode="json"), "detector": {**spec.detector.model_dump(mode="json"), **detector}})
        messages = []
        det = DETECTORS["strongest_feature"](Inputs(s, store, exp, dev, messages.append, labels))
        return det, messages

    cw, msgs = detect()
    assert spec.detector.prepare == "clean_whiten" and not any("fewer than" in m for m in msgs)
    m = detection_metrics(cw.scores, cw.flags, truth)
    assert m["auroc"] > 0.95 and m["recall"] > 0.8 and m["precision"] > 0.5, m
    assert any("above all 200 clean test examples" in x for x in msgs)      # the test null ran
    tc, msgs = detect(prepare="divide_q_test_center")
    assert detection_metrics(tc.scores, tc.flags, truth)["auroc"] > 0.95
    assert not any("clean test examples" in x for x in msgs)               # no test rows: Otsu only
    for prepare in ("clean_whiten", "divide_q_test_center"):
        fallback, msgs = detect(prepare=prepare, min_reference=50)          # 20 test images per label: too few
        assert any("fewer than 50 test examples" in x for x in msgs)
        dc, _ = detect(prepare="divide_q_double_center")
        np.testing.assert_array_equal(fallback.scores, dc.scores)
    assert not np.array_equal(tc.scores, dc.scores) and not np.array_equal(cw.scores, tc.scores)
    dm, msgs = detect(input="datamodels", prepare="divide_q_double_center")   # the paper's input, 26 models
    assert dm.scores.shape == (400,) and np.isfinite(dm.scores).all()
    assert any("datamodels (train x train): path step" in m for m in msgs)

    # retraining without a flagged set is stored by (spec, training set, mask): the same mask is not
    # retrained, a different mask or another recipe is
    from ops import backdoor as B

    inp = Inputs(spec, store, exp, dev, log.append, labels)
    first = B.retrain_without(spec, inp, truth, 0)
    assert first[1] is not None and first[1] < 0.5 and len(list(store.path(exp, B.REPORT, "retrain").glob("*.json"))) == 1
    trained = []
    real = B.train_stacked
    monkeypatch.setattr(B, "train_stacked", lambda *a, **k: trained.append(1) or real(*a, **k))
    assert B.retrain_without(spec, inp, truth, 0) == first and not trained
    other = truth.copy()
    other[np.flatnonzero(~truth)[0]] = True
    B.retrain_without(spec, inp, other, 0)
    assert len(trained) == 1
    longer = parse_spec({**spec.model_dump(mode="json"), "training": {**spec.training.model_dump(mode="json"),
                                                                      "epochs": 11}})
    assert B.retrain_key(longer, store, exp, truth) != B.retrain_key(spec, store, exp, truth)
    assert B.retrain_key(spec, store, exp, truth) == B.retrain_key(
        parse_spec({**spec.model_dump(mode="json"), "detector": {"restarts": 3}}), store, exp, truth)


def test_datamodels_train_x_train_regresses_each_examples_margin_on_the_masks(tmp_path):
    """Rows are targets: margin_i = sum_j W[i, j] 1[j in S] + noise over random masks; the fit recovers
    the planted influences with the orientation right and the self effect on the diagonal."""
    from ops.attribution import datamodels_train_x_train
    from ops.spec import parse_spec
    from ops.store import ArtifactStore

    rng = np.random.default_rng(0)
    n, m = 30, 400
    masks = rng.uniform(size=(m, n)) < 0.5
    w = np.zeros((n, n))
    w[np.arange(n), np.arange(n)] = 2.0                   # being trained on
    w[3, 7] = 1.0                                         # 7 supports target 3, not the other way round
    w[10, 11] = -0.8
    margins = masks @ w.T + 0.05 * rng.standard_normal((m, n))
    store = ArtifactStore(tmp_path)
    store.save_npy("e", "subset_masks", "masks.npy", masks)
    store.save_npy("e", "model_outputs", "margins_train.npy", np.vstack([margins, np.zeros((1, n))]))   # + full model
    a = datamodels_train_x_train(parse_spec({"name": "e", "datamodels": {"n_lambdas": 6, "tol": 1e-6}}),
                                 store, "e", lambda msg: None)
    assert a.shape == (n, n)
    np.testing.assert_allclose(np.diag(a), 2.0, atol=0.1)
    assert a[3, 7] > 0.8 and abs(a[7, 3]) < 0.1 and a[10, 11] < -0.6
    off = ~np.eye(n, dtype=bool)
    off[3, 7] = off[10, 11] = False
    assert np.abs(a[off]).max() < 0.1


def test_the_score_plot_draws_the_histogram_and_every_roc_and_survives_unknown_truth(tmp_path):
    import polars as pl

    from ops.backdoor import plot_scores

    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.1
    rows = []
    for m, shift in (("strongest_feature", 3.0), ("spectre", 0.5)):
        score = rng.standard_normal(300) + shift * truth
        rows.append(pl.DataFrame({"method": m, "score": score, "flagged": score > 2, "poisoned": truth}))
    scores = pl.concat(rows)
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    p = plot_scores(scores, tmp_path / "s.png", "spectre")
    assert p.read_bytes()[:4] == b"\x89PNG" and plt.get_fignums() == before      # written, closed
    unknown = scores.with_columns(poisoned=pl.lit(None, dtype=pl.Boolean))
    assert plot_scores(unknown, tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"   # histogram only
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[0] > Image.open(tmp_path / "u.png").size[0]   # two panels vs one


def test_the_top_flagged_grid_frames_poisons_and_captions_labels(tmp_path):
    import io

    from PIL import Image

    from ops.backdoor import top_grid

    rng = np.random.default_rng(1)
    images = rng.integers(0, 200, (20, 8, 8, 1), dtype=np.uint8)
    truth = np.zeros(20, bool)
    truth[[3, 7]] = True
    order = np.argsort(-np.arange(20))                        # 19, 18, ..., 0
    plain = Image.open(io.BytesIO(top_grid(images, order, truth, count=16, cols=8)))
    labelled = Image.open(io.BytesIO(top_grid(images, order, truth, count=16, cols=8,
                                              captions=[f"class {i % 3}" for i in range(20)])))
    assert labelled.height > plain.height                      # a caption strip under every row
    a = np.asarray(labelled)
    cw, ch = labelled.width // 8, labelled.height // 2
    # example 7 is ranked 13th (row 1, column 4): its frame is red; example 18 (rank 2) is not framed
    r, c = divmod(12, 8)
    assert tuple(a[r * ch + 1, c * cw + (cw - 30) // 2 + 1]) == (220, 30, 30)
    assert tuple(a[1, cw + (cw - 30) // 2 + 1]) != (220, 30, 30)
    assert (a[r * ch + 30: (r + 1) * ch, c * cw: (c + 1) * cw] < 100).any()   # caption text drawn
