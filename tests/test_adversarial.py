"""PGD (kernels/adversarial.py) and adversarial training in the training engine."""
import numpy as np
import pytest
import torch

from kernels.adversarial import Threat, per_example_ce, pgd, pgd_reference, random_start, robust_correct, to_pixels
from kernels.models import build_model
from kernels.train import Recipe, predict_stacked, train_stacked

MEAN, STD = (0.3,), (0.2,)


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    pixels = (torch.rand(n, 1, 6, 6, generator=g) * 0.5 + 0.15 * y.view(-1, 1, 1, 1)).clamp(0, 1)
    return (pixels - MEAN[0]) / STD[0], y        # normalized, as the trainer sees them


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 6, 6), 3, 16).eval()


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 0.6)])
def test_pgd_equals_the_written_out_algorithm(norm, eps):
    x, y = _images()
    model = _model()
    threat = Threat(norm, eps, eps / 3, 4, True, MEAN, STD)
    g = torch.Generator().manual_seed(3)
    starts = random_start(x.shape, threat, g, 1, x.device, x.dtype)
    fast = pgd(lambda z: per_example_ce(model(z), y), x, threat, starts=starts)
    ref = torch.stack([pgd_reference(lambda z1, i=i: per_example_ce(model(z1[None]), y[i:i + 1])[0],
                                     x[i:i + 1], threat, starts[i:i + 1])[0] for i in range(len(x))])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_the_attack_raises_the_loss_and_never_leaves_the_ball_or_the_box(norm, eps):
    x, y = _images(64)
    model = _model(1)
    recipe = Recipe(epochs=30, batch_size=16, lr=0.1, amp=False)
    params = train_stacked(lambda: build_model("mlp", (1, 6, 6), 3, 16), x, y, [np.arange(64)], [1], recipe)
    model.load_state_dict({k: v[0] for k, v in params.items()})
    threat = Threat(norm, eps, eps / 4, 10, True, MEAN, STD)
    xa = pgd(lambda z: per_example_ce(model(z), y), x, threat, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, adv = per_example_ce(model(x), y), per_example_ce(model(xa), y)
    assert (adv >= clean - 1e-6).all() and adv.mean() > clean.mean() * 1.2
    delta = to_pixels(xa, threat) - to_pixels(x, threat)
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-5).all()
    p = to_pixels(xa, threat)
    assert p.min() >= -1e-6 and p.max() <= 1 + 1e-6
    # robust accuracy is at most natural accuracy, and falls as the budget grows
    acc = [robust_correct(model, x, y, Threat(norm, e, max(e, 1e-3) / 4, 10, True, MEAN, STD), restarts=2).float().mean()
           for e in (0.0, eps, 4 * eps)]
    assert acc[0] >= acc[1] >= acc[2] and acc[2] < acc[0]


def test_adversarial_training_in_lockstep_equals_training_alone_and_buys_robustness():
    x, y = _images(96, seed=2)
    make = lambda: build_model("mlp", (1, 6, 6), 3, 16)  # noqa: E731
    subsets = [np.arange(0, 96, 2), np.arange(1, 96, 2)]
    threat = Threat("linf", 0.05, 0.02, 3, True, MEAN, STD)
    recipe = Recipe(epochs=3, batch_size=16, lr=0.05, amp=False, adversarial=threat)
    together = train_stacked(make, x, y, subsets, [5, 6], recipe, lockstep=True)
    alone = train_stacked(make, x, y, subsets[1:], [6], recipe, lockstep=True)
    sequential = train_stacked(make, x, y, subsets[1:], [6], recipe, lockstep=False)
    plain = train_stacked(make, x, y, subsets[1:], [6], Recipe(epochs=3, batch_size=16, lr=0.05, amp=False))
    for k in alone:
        torch.testing.assert_close(together[k][1], alone[k][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sequential[k][0], alone[k][0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain[k][0], alone[k][0])            # the attack changed training

    # on data where a small budget flips a standard model, PGD-AT keeps more examples
    xs, ys = _images(300, seed=5)
    big = Recipe(epochs=25, batch_size=32, lr=0.05, amp=False)
    eps = 0.06
    std_p = train_stacked(make, xs, ys, [np.arange(300)], [0], big)
    rob_p = train_stacked(make, xs, ys, [np.arange(300)], [0],
                          Recipe(epochs=25, batch_size=32, lr=0.05, amp=False,
                                 adversarial=Threat("linf", eps, eps / 3, 5, True, MEAN, STD)))
    attack = Threat("linf", eps, eps / 8, 20, True, MEAN, STD)
    accs = {}
    for name, p in (("standard", std_p), ("robust", rob_p)):
        m = make()
        m.load_state_dict({k: v[0] for k, v in p.items()})
        m.eval()
        accs[name] = robust_correct(m, xs, ys, attack, restarts=2).float().mean().item()
    assert accs["robust"] > accs["standard"] + 0.05, accs


def test_bad_threats_are_refused():
    with pytest.raises(ValueError, match="norm"):
        Threat("l1", 0.1)
    with pytest.raises(ValueError, match="eps"):
        Threat("linf", -0.1)
