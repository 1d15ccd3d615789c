"""Smallify numerics (kernels/smallify.py): switches, the L1 penalty, sign-variance tracking, and
physical removal of units checked against the masked reference, outputs and optimizer state."""
import copy

import pytest
import torch
from torch import nn

from kernels.smallify import (SignVarianceTracker, SwitchLayer, accuracy, count_params, fold, latency,
                              make_optimizer, mask, penalty, prune, smallify_cnn, smallify_mlp, static_cnn,
                              static_mlp, switches, train_smallify, widths)

LR = {"sgd": 0.05, "adam": 0.01}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return smallify_mlp(6, [5, 4], 3)


def _cnn(seed=0):    # conv -> conv -> flatten -> hidden linear -> head: every kind of transition
    torch.manual_seed(seed)
    return smallify_cnn(2, [4, 5], 3, 8, hidden=[6])


def _batch(model_kind, n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) if model_kind == "mlp" else torch.randn(n, 2, 8, 8, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def _loss(model, x, y, lam=0.02):
    return nn.functional.cross_entropy(model(x), y) + penalty(model, lam)


def _steps(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()


def _copy(model, opt, kind):
    """An independent copy of a model and its optimizer (state tensors not shared)."""
    m = copy.deepcopy(model)
    o = make_optimizer(m, kind, LR[kind], 0.9, 1e-3)
    o.load_state_dict(copy.deepcopy(opt.state_dict()))
    return m, o


# Independent slicing of the full (masked) model's tensors down to the kept units, written out per
# layer of the two test architectures: key -> (keep mask index for rows, for columns, flatten group).
# Switch masks: k[0], k[1], ... in forward order.
MLP_SLICES = {"1.weight": (0, None), "1.bias": (0, None), "2.beta": (0, None),
              "4.weight": (1, 0), "4.bias": (1, None), "5.beta": (1, None),
              "7.weight": (None, 1), "7.bias": (None, None)}
CNN_SLICES = {"0.weight": (0, None), "0.bias": (0, None), "1.beta": (0, None),
              "4.weight": (1, 0), "4.bias": (1, None), "5.beta": (1, None),
              "9.weight": (2, "flat1"), "9.bias": (2, None), "10.beta": (2, None),
              "12.weight": (None, 2), "12.bias": (None, None)}


def _reference_slice(key, t, keep, slices):
    r, c = slices[key]
    if r is not None:
        t = t[keep[r]]
    if c == "flat1":       # columns of the first linear after the flatten: channel-major groups of H*W
        t = t.reshape(t.shape[0], len(keep[1]), -1)[:, keep[1]].reshape(t.shape[0], -1)
    elif c is not None:
        t = t[:, keep[c]]
    return t


def _keep(kind):
    if kind == "mlp":
        return [torch.tensor([1, 0, 1, 1, 0]).bool(), torch.tensor([0, 1, 1, 0]).bool()]
    return [torch.tensor([1, 0, 1, 1]).bool(), torch.tensor([0, 1, 1, 0, 1]).bool(),
            torch.tensor([1, 1, 0, 1, 0, 1]).bool()]


def test_switch_multiplies_each_unit_and_each_channel():
    s = SwitchLayer(3)
    assert torch.equal(s.beta.detach(), torch.ones(3))      # default init: ones
    with torch.no_grad():
        s.beta.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.randn(4, 3)
    torch.testing.assert_close(s(x), x * torch.tensor([2.0, -1.0, 0.5]))
    img = torch.randn(4, 3, 5, 5)
    out = s(img)
    for c, b in enumerate([2.0, -1.0, 0.5]):
        torch.testing.assert_close(out[:, c], img[:, c] * b)
    with pytest.raises(ValueError, match="takes"):
        s(torch.randn(4, 3, 5))
    torch.manual_seed(0)
    drawn = SwitchLayer(1000, init_std=1e-2).beta.detach()
    assert abs(float(drawn.mean()) - 1) < 2e-3 and 5e-3 < float(drawn.std()) < 2e-2


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_unit_whose_switch_is_zero_changes_no_output_and_removing_it_changes_nothing(kind):
    model = _mlp() if kind == "mlp" else _cnn()
    x, _ = _batch(kind)
    sw = switches(model)
    layers = list(model)
    with torch.no_grad():
        for s in sw:
            s.beta.copy_(torch.linspace(0.5, 1.5, s.n))
        sw[0].beta[1] = 0.0
        before = model(x)
        # the unit is dead: its incoming row and outgoing column can be anything
        i = layers.index(sw[0])
        producer, consumer = layers[i - 1], next(m for m in layers[i + 1:] if isinstance(m, (nn.Linear, nn.Conv2d)))
        producer.weight[1] += 3.0
        producer.bias[1] -= 2.0
        consumer.weight[:, 1] *= -5.0
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
        # and the output is not insensitive to everything: a live unit's switch does matter
        sw[0].beta[0] += 1.0
        assert (model(x) - before).abs().max() > 1e-3
        sw[0].beta[0] -= 1.0
    keep = [torch.ones(s.n, dtype=torch.bool) for s in sw]
    keep[0][1] = False
    n_before = count_params(model)
    model, _ = prune(model, None, keep)
    assert widths(model)[0] == sw[0].n == len(keep[0]) - 1
    assert count_params(model) < n_before
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_pruned_model_equals_masked_model_in_outputs_and_after_more_optimizer_steps(kind, opt_kind):
    model = _mlp() if kind == "mlp" else _cnn()
    x, y = _batch(kind)
    opt = make_optimizer(model, opt_kind, LR[opt_kind], 0.9, 1e-3)
    _steps(model, opt, x, y, 3)          # optimizer state (momentum, Adam moments) is nonzero now
    keep = _keep(kind)
    ref, ref_opt = _copy(model, opt, opt_kind)
    mask(ref, keep)
    small, small_opt = _copy(model, opt, opt_kind)
    small, small_opt = prune(small, small_opt, keep)

    assert widths(small) == widths(ref) == [int(k.sum()) for k in keep]
    assert count_params(small) < count_params(model)
    slices = MLP_SLICES if kind == "mlp" else CNN_SLICES
    assert set(dict(small.named_parameters())) == set(slices)
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_loss(small, x, y), _loss(ref, x, y), rtol=1e-5, atol=1e-6)

    _steps(ref, ref_opt, x, y, 2)
    _steps(small, small_opt, x, y, 2)
    full = dict(ref.named_parameters())
    moved = False
    for key, p in small.named_parameters():
        expect = _reference_slice(key, full[key].detach(), keep, slices)
        assert p.shape == expect.shape, key
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-6, msg=key)
        state, ref_state = small_opt.state[p], ref_opt.state[full[key]]
        for name, v in state.items():
            if v.shape == p.shape:
                torch.testing.assert_close(v, _reference_slice(key, ref_state[name], keep, slices), rtol=1e-5,
                                           atol=1e-6, msg=f"{key} {name}")
            else:
                torch.testing.assert_close(v, ref_state[name])     # Adam's step count
        moved |= not torch.allclose(p.detach(), _reference_slice(key, dict(model.named_parameters())[key].detach(),
                                                                   keep, slices))
    assert moved                       # the steps did something
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-6)


def test_a_state_without_the_slicing_would_be_caught():
    """The comparison above can fail: prune with a fresh (stateless) optimizer diverges from the
    masked model that kept its momentum."""
    model = _mlp()
    x, y = _batch("mlp")
    opt = make_optimizer(model, "sgd", LR["sgd"], 0.9, 1e-3)
    _steps(model, opt, x, y, 3)
    keep = _keep("mlp")
    ref, ref_opt = _copy(model, opt, "sgd")
    mask(ref, keep)
    small = prune(copy.deepcopy(model), None, keep)[0]
    fresh = make_optimizer(small, "sgd", LR["sgd"], 0.9, 1e-3)
    _steps(ref, ref_opt, x, y, 1)
    _steps(small, fresh, x, y, 1)
    assert not torch.allclose(small(x), ref(x), rtol=1e-5, atol=1e-6)


def test_prune_keeps_a_unit_per_layer_repeats_and_combines_with_a_mask():
    model = _cnn()
    x, _ = _batch("cnn")
    with torch.no_grad():
        switches(model)[1].beta.copy_(torch.tensor([0.1, -0.2, 3.0, 0.3, 0.0]))
    keep = [torch.ones(4, dtype=torch.bool), torch.zeros(5, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]
    ref = mask(copy.deepcopy(model), keep)
    model, _ = prune(model, None, keep)
    assert widths(model) == [4, 1, 6]
    torch.testing.assert_close(switches(model)[1].beta.detach(), torch.tensor([3.0]))    # the largest |β| stays
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    # a second round on the smaller model, against a second mask on the reference
    first, last = torch.tensor([0, 1, 1, 1]).bool(), torch.tensor([1, 0, 0, 1, 1, 1]).bool()
    model, _ = prune(model, None, [first, torch.ones(1, dtype=torch.bool), last])
    full2 = [first, torch.ones(5, dtype=torch.bool), last]
    mask(ref, full2)
    assert widths(model) == widths(ref) == [3, 1, 4]
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    # a pruned masked model drops its masked units
    again, _ = prune(ref, None, [torch.ones(s.n, dtype=torch.bool) for s in switches(ref)])
    assert [s.n for s in switches(again)] == [3, 1, 4]
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-6)


def test_prune_refuses_what_it_cannot_remove_exactly():
    model = nn.Sequential(nn.Linear(4, 3), SwitchLayer(3), nn.Sigmoid(), nn.Linear(3, 2))   # sigmoid(0) != 0
    with pytest.raises(TypeError, match="consumed by Sigmoid"):
        prune(model, None, [torch.tensor([1, 0, 1]).bool()])
    head = nn.Sequential(nn.Linear(4, 3), SwitchLayer(3))
    with pytest.raises(TypeError, match="consumed by nothing"):
        prune(head, None, [torch.tensor([1, 0, 1]).bool()])
    with pytest.raises(ValueError, match="keep masks"):
        prune(_mlp(), None, [torch.ones(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="shape"):
        prune(_mlp(), None, [torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fold_gives_the_static_model_of_the_same_widths(kind):
    model = _mlp() if kind == "mlp" else _cnn()
    x, _ = _batch(kind)
    with torch.no_grad():
        for s in switches(model):
            s.beta.uniform_(-2, 2)
    model, _ = prune(model, None, _keep(kind))
    folded = fold(model)
    assert not switches(folded)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    w = widths(model)
    static = static_mlp(6, w, 3) if kind == "mlp" else static_cnn(2, w[:2], 3, 8, hidden=w[2:])
    static.load_state_dict(folded.state_dict())
    assert count_params(static) == count_params(folded) == count_params(model) - sum(w)
    # and the pruned model's state dict loads into a freshly built smallify model of its widths
    rebuilt = smallify_mlp(6, w, 3) if kind == "mlp" else smallify_cnn(2, w[:2], 3, 8, hidden=w[2:])
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))


def test_same_seed_gives_the_same_weights_with_and_without_switches():
    torch.manual_seed(3)
    a = smallify_mlp(6, [5, 4], 3)
    torch.manual_seed(3)
    b = static_mlp(6, [5, 4], 3)
    torch.testing.assert_close(a(torch.ones(2, 6)), b(torch.ones(2, 6)))


def test_penalty_is_lambda_times_the_sum_of_absolute_switches():
    model = _mlp()
    with torch.no_grad():
        switches(model)[0].beta.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]))
        switches(model)[1].beta.copy_(torch.tensor([-1.0, 1.0, 1.0, 2.0]))
    assert float(penalty(model, 0.1).detach()) == pytest.approx(0.1 * (6.5 + 5.0))
    keep = _keep("mlp")
    masked = mask(copy.deepcopy(model), keep)
    assert float(penalty(masked, 0.1).detach()) == pytest.approx(0.1 * (1.0 + 0.5 + 0.0 + 1.0 + 1.0))
    small, _ = prune(copy.deepcopy(model), None, keep)
    assert float(penalty(small, 0.1).detach()) == pytest.approx(float(penalty(masked, 0.1).detach()))
    assert float(penalty(static_mlp(6, [5], 3), 0.1)) == 0.0


def test_tracker_flags_a_flipping_switch_and_not_a_steady_one():
    torch.manual_seed(0)
    model = smallify_mlp(4, [4], 2)
    sw = switches(model)[0]
    with torch.no_grad():
        sw.beta.copy_(torch.tensor([0.01, 1.0, -0.5, 0.01]))
    tracker = SignVarianceTracker(model)      # momentum 0.99
    g = torch.Generator().manual_seed(0)
    for t in range(300):
        with torch.no_grad():
            noise = 0.01 * torch.randn(4, generator=g)
            # unit 0 flips every step, 1 stays positive, 2 stays negative, 3 has random signs
            sw.beta.copy_(torch.tensor([(-1) ** t * 0.01, 1.0, -0.5, 0.0]) + noise * torch.tensor([0, 1, 1, 1]))
        tracker.update(model)
    assert len(tracker.prunable(0.5)) == 1
    assert tracker.prunable(0.5)[0].tolist() == [True, False, False, True]
    assert float(tracker.var[0][1]) == float(tracker.var[0][2]) == 0.0
    assert float(tracker.var[0][0]) > 0.9
    # |β| test, off by default
    assert tracker.prunable(2.0, model, min_abs=0.1)[0].tolist() == [True, False, False, True]
    tracker.slice([torch.tensor([0, 1, 1, 0]).bool()])
    assert tracker.prunable(0.5)[0].tolist() == [False, False]


def _few_units_task(n=600, seed=0):
    """Three classes from two of twelve input features (the rest noise): a couple of hidden units do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    score = x[:, 0] + 0.5 * x[:, 1]
    y = (score > -0.5).long() + (score > 0.5).long()
    return x, y


def _train(lam, seed=0, epochs=12, lr=0.05, **kw):
    torch.set_num_threads(1)       # tiny model: threads only cost (conftest sets 2 again for the next test)
    x, y = _few_units_task()
    torch.manual_seed(seed)
    model = smallify_mlp(12, [32, 32], 3)
    model, hist = train_smallify(model, (x[:400], y[:400]), epochs=epochs, batch_size=32, lr=lr, lam=lam,
                                 prune_every=25, seed=seed, **kw)
    return model, hist, accuracy(model, x[400:], y[400:])


def test_train_smallify_removes_units_the_task_does_not_need():
    model, hist, acc = _train(0.03)
    assert sum(widths(model)) < 0.5 * 64, widths(model)
    assert acc > 0.8, acc                                           # chance: about 1/3
    assert hist[-1]["widths"] == widths(model) and hist[-1]["params"] == count_params(model)
    assert hist[-1]["step"] == 12 * 13
    assert [h["step"] for h in hist[:-1]] == list(range(25, 12 * 13 + 1, 25))
    assert sum(h["removed"] for h in hist) == 64 - sum(widths(model))
    assert all(a["params"] >= b["params"] for a, b in zip(hist, hist[1:]))
    dense, _, dense_acc = _train(0.0)
    assert sum(widths(dense)) >= 60, widths(dense)                  # λ = 0: (almost) nothing removed
    assert dense_acc > 0.8


def test_train_smallify_is_deterministic_for_a_seed_and_reports_progress():
    seen = []
    a, ha, _ = _train(0.03, epochs=4, progress=lambda e, loss, w: seen.append((e, loss, w)))
    b, hb, _ = _train(0.03, epochs=4)
    assert ha == hb
    assert [e for e, _, _ in seen] == [0, 1, 2, 3] and seen[-1][2] == widths(a)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c, hc, _ = _train(0.03, seed=1, epochs=4)
    assert hc != ha


def test_train_smallify_with_adam_prunes_too():
    model, _, acc = _train(0.05, optimizer="adam", lr=0.02)
    assert sum(widths(model)) < 0.75 * 64, widths(model)
    assert acc > 0.8, acc


def test_count_params_and_latency():
    model = static_mlp(10, [7], 3)
    assert count_params(model) == 10 * 7 + 7 + 7 * 3 + 3
    assert count_params(smallify_mlp(10, [7], 3)) == count_params(model) + 7
    model.train()
    t = latency(model, (10,), batch=4, repeats=5, warmup=1)
    assert 0 < t < 1.0
    assert model.training                                           # mode restored
