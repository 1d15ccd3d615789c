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
