import pytest
import numpy as np
import torch

from kernels.models import build_model, margin
from kernels.train import Recipe, predict_stacked, train_stacked


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def test_model_in_a_batch_equals_model_alone():
    x, y = _data()
    make = lambda: build_model("mlp", (1, 4, 4), 3, 16)  # noqa: E731
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(200, 100, replace=False)) for _ in range(3)]
    recipe = Recipe(epochs=3, batch_size=16, lr=0.05)
    together = train_stacked(make, x, y, subsets, [11, 12, 13], recipe)
    alone = train_stacked(make, x, y, subsets[1:2], [12], recipe)
    for k in alone:
        torch.testing.assert_close(together[k][1], alone[k][0], rtol=1e-5, atol=1e-6)
    # and differs from its neighbours (different mask and seed)
    assert not torch.allclose(together["fc1.weight"][0], together["fc1.weight"][1])


def test_training_learns():
    x, y = _data(400)
    make = lambda: build_model("logreg", (1, 4, 4), 3)  # noqa: E731
    params = train_stacked(make, x, y, [np.arange(400)], [0], Recipe(epochs=10, batch_size=32, lr=0.1))
    acc = (predict_stacked(make, params, x).argmax(-1) == y).float().mean().item()
    assert acc > 0.8


def test_margin_is_logit_minus_logsumexp_of_others():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    expect = torch.tensor([2.0 - np.log(np.exp(0.5) + np.exp(-1.0)), 1.0 - np.log(np.exp(0.0) + np.exp(3.0))])
    torch.testing.assert_close(margin(logits, labels), expect.float())


def test_schedules():
    from kernels.train import lr_factor

    r = Recipe(schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [lr_factor(r, s, 100) for s in (0, 49, 50, 80)] == [1.0, 1.0, 0.1, pytest.approx(0.01)]
    c = Recipe(schedule="cosine")
    assert lr_factor(c, 0, 10) == 1.0 and lr_factor(c, 5, 10) == pytest.approx(0.5)
    t = Recipe(schedule="triangular", peak_epoch_frac=0.25)
    assert lr_factor(t, 25, 100) == 1.0 and lr_factor(t, 0, 100) == 0.0 and lr_factor(t, 100, 100) == 0.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(Recipe(schedule="warp"), 0, 1)


def test_two_regime_switches_from_plain_sgd_to_momentum_at_small_lr():
    from kernels.train import current_optimizer, make_optimizers

    r = Recipe(schedule="two_regime", lr=0.2, small_lr=0.01, switch_frac=0.6, momentum=0.9)
    w = torch.nn.Parameter(torch.zeros(3))
    opts = make_optimizers(r, [w])
    assert len(opts) == 2 and opts[0].param_groups[0]["momentum"] == 0.0
    first, lr0 = current_optimizer(r, opts, 10, 100)
    second, lr1 = current_optimizer(r, opts, 60, 100)
    assert first is opts[0] and lr0 == 0.2
    assert second is opts[1] and second.param_groups[0]["momentum"] == 0.9 and lr1 == pytest.approx(0.01)


def test_float_augmentation_matches_the_transform_references():
    from kernels.train import augment
    from kernels.transforms import Cutout, RandomHorizontalFlip, RandomTranslate

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 9, 7)).astype(np.float32)
    flip = np.array([0, 1, 0, 1, 1, 0], bool)
    ty, tx = rng.integers(-2, 3, 6), rng.integers(-2, 3, 6)
    cy, cx = rng.integers(0, 9, 6), rng.integers(0, 7, 6)
    out = augment(torch.from_numpy(x), *(torch.from_numpy(a) for a in (flip, ty, tx, cy, cx)), 3).numpy()
    for i in range(6):
        img = x[i].transpose(1, 2, 0)
        img = RandomHorizontalFlip.reference(img, flip[i])
        img = RandomTranslate.reference(img, int(ty[i]), int(tx[i]), 0)
        img = Cutout.reference(img, int(cy[i]), int(cx[i]), 3, 0)
        np.testing.assert_array_equal(out[i], img.transpose(2, 0, 1))


def test_augmented_model_in_a_batch_equals_model_alone():
    x, y = _data(120)
    make = lambda: build_model("small_cnn", (1, 4, 4), 3, 4)  # noqa: E731
    subsets = [np.arange(0, 120, 2), np.arange(1, 120, 2)]
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05, flip=True, translate=1, cutout=2, schedule="cosine",
                    amp=False)   # float32: the paths are compared to rounding error
    together = train_stacked(make, x, y, subsets, [5, 6], recipe, lockstep=True)
    alone = train_stacked(make, x, y, subsets[1:], [6], recipe, lockstep=True)
    sequential = train_stacked(make, x, y, subsets[1:], [6], recipe, lockstep=False)
    for k in alone:
        torch.testing.assert_close(together[k][1], alone[k][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sequential[k][0], alone[k][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", [False, True])
def test_cpu_cnn_in_a_concurrent_group_equals_it_alone_bit_for_bit(amp):
    """CPU convolutional models train one per core, each on one thread: the result of a model does
    not depend on its companions (or on the machine's core count), in float32 and in bfloat16."""
    x, y = _data(96)
    x = x.repeat(1, 1, 2, 2)                                     # 1 x 8 x 8
    make = lambda: build_model("small_cnn", (1, 8, 8), 3, 4)  # noqa: E731
    subsets = [np.arange(0, 96, 2), np.arange(1, 96, 2), np.arange(0, 48)]
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05, flip=True, translate=1, amp=amp)
    threads = torch.get_num_threads()
    together = train_stacked(make, x, y, subsets, [5, 6, 7], recipe)
    torch.set_num_threads(1)
    try:
        alone = train_stacked(make, x, y, subsets[1:2], [6], recipe)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads                   # restored after training
    for k in alone:
        assert torch.equal(together[k][1], alone[k][0]), k
        assert together[k].is_contiguous()
    assert not torch.equal(together["conv1.weight"][0], together["conv1.weight"][1])


def test_cpu_cnn_with_dropout_is_reproducible():
    """Dropout draws from the global generator while training: such models train one at a time."""
    from torch import nn

    from kernels.train import has_random_layers

    x, y = _data(64)
    make = lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),  # noqa: E731
                                 nn.Flatten(), nn.Linear(64, 3))
    assert has_random_layers(make()) and not has_random_layers(build_model("small_cnn", (1, 8, 8), 3, 4))
    subsets = [np.arange(0, 64, 2), np.arange(1, 64, 2)]
    a, b = (train_stacked(make, x, y, subsets, [1, 2], Recipe(epochs=3, batch_size=8)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precision_rule():
    from kernels.train import cpu_has_native_bf16, uses_bf16

    cpu, cnn, mlp = torch.device("cpu"), build_model("small_cnn", (1, 8, 8), 3, 4), build_model("mlp", (1, 4, 4), 3, 8)
    assert uses_bf16(Recipe(amp=True), mlp, cpu) and not uses_bf16(Recipe(amp=False), cnn, cpu)
    assert not uses_bf16(Recipe(amp="auto"), mlp, cpu)
    assert uses_bf16(Recipe(amp="auto"), cnn, cpu) == cpu_has_native_bf16()
    with pytest.raises(ValueError, match="amp"):
        uses_bf16(Recipe(amp="yes"), cnn, cpu)


def test_resnet9_trains_with_batchnorm_and_flip_tta():
    x, y = _data(64)
    x = x.repeat(1, 3, 4, 4)                                     # 3 x 16 x 16
    make = lambda: build_model("resnet9", (3, 16, 16), 3, 8)  # noqa: E731
    params = train_stacked(make, x, y, [np.arange(64), np.arange(32)], [0, 1],
                           Recipe(epochs=2, batch_size=16, lr=0.05, optimizer="adam", label_smoothing=0.1))
    assert "features.0.1.running_mean" in params and params["out.weight"].shape == (2, 3, 16)
    assert not torch.equal(params["features.0.1.running_mean"][0], torch.zeros(8))
    logits = predict_stacked(make, params, x, tta_flip=True)
    assert logits.shape == (2, 64, 3) and torch.isfinite(logits).all()
    single = predict_stacked(make, {k: v[:1] for k, v in params.items()}, x, tta_flip=True)
    torch.testing.assert_close(single[0], logits[0])


def test_lockstep_is_used_where_it_pays():
    from kernels.train import lockstep_pays

    cpu = torch.device("cpu")
    assert lockstep_pays(build_model("mlp", (1, 4, 4), 3, 8), cpu)
    assert not lockstep_pays(build_model("small_cnn", (1, 4, 4), 3, 4), cpu)
    assert lockstep_pays(build_model("small_cnn", (1, 4, 4), 3, 4), torch.device("cuda"))
    assert not lockstep_pays(build_model("resnet9", (3, 16, 16), 3, 4), torch.device("cuda"))


def test_snapshots_are_the_model_after_that_epoch():
    x, y = _data(80)
    make = lambda: build_model("mlp", (1, 4, 4), 3, 8)  # noqa: E731
    subsets = [np.arange(0, 80, 2), np.arange(1, 80, 2)]
    snaps = {2: None}
    full = train_stacked(make, x, y, subsets, [1, 2], Recipe(epochs=4, batch_size=8, schedule="constant"), snapshots=snaps)
    short = train_stacked(make, x, y, subsets, [1, 2], Recipe(epochs=2, batch_size=8, schedule="constant"))
    for k in short:
        torch.testing.assert_close(snaps[2][k], short[k])
        assert not torch.equal(snaps[2][k], full[k])
    seq = {2: None}
    train_stacked(make, x, y, subsets, [1, 2], Recipe(epochs=4, batch_size=8, schedule="constant"), snapshots=seq,
                  lockstep=False)
    for k in short:
        torch.testing.assert_close(seq[2][k], short[k], rtol=1e-4, atol=1e-5)


def test_torchvision_model_trains_predicts_and_embeds():
    x, y = _data(48)
    x = x.repeat(1, 1, 8, 8)                                      # 1 x 32 x 32, grayscale
    make = lambda: build_model("torchvision.resnet18", (1, 32, 32), 3)  # noqa: E731
    params = train_stacked(make, x, y, [np.arange(48), np.arange(24)], [0, 1], Recipe(epochs=1, batch_size=16))
    assert params["net.fc.weight"].shape == (2, 3, 512) and "net.bn1.running_var" in params
    logits = predict_stacked(make, params, x)
    assert logits.shape == (2, 48, 3) and torch.isfinite(logits).all()
    model = make().eval()
    assert model.embed(x[:5]).shape == (5, 512)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_model("torchvision.resnet1", (1, 32, 32), 3)


def test_spec_names_torchvision_models():
    from ops.spec import SpecError, parse_spec

    assert parse_spec({"name": "t", "model": {"arch": "torchvision.mobilenet_v3_small"}}).model.arch.endswith("small")
    with pytest.raises(SpecError, match="did you mean resnet18"):
        parse_spec({"name": "t", "model": {"arch": "torchvision.resnet81"}})
    with pytest.raises(SpecError, match="model.arch"):
        parse_spec({"name": "t", "model": {"arch": "lenet"}})


def test_cpu_cnn_prediction_equals_each_model_alone():
    """predict_stacked runs CPU CNNs one after another in channels-last: same logits as each model's
    own forward pass (NCHW), and the mirror average under TTA."""
    from kernels.train import init_stacked

    make = lambda: build_model("small_cnn", (1, 8, 8), 3, 4)  # noqa: E731
    _, params = init_stacked(make, [3, 4, 5])
    x = torch.randn(700, 1, 8, 8)                     # more than one chunk
    logits = predict_stacked(make, params, x)
    tta = predict_stacked(make, params, x, tta_flip=True)
    model = make().eval()
    with torch.no_grad():
        for i in range(3):
            model.load_state_dict({k: v[i] for k, v in params.items()})
            torch.testing.assert_close(logits[i], model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tta[i], (model(x) + model(x.flip(-1))) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_keeps_freed_memory_unless_the_user_tuned_it():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "from kernels.train import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    root = Path(__file__).resolve().parents[1]
    run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=root, env=e, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.split()[-1]
    assert run(env) == "True"                                  # mallopt accepted every setting
    assert run({**env, "MALLOC_TOP_PAD_": "0"}) == "False"     # the user's own setting wins
