"""PhotoGuard numerics (kernels/photoguard.py) on tiny random diffusers models: the attacks keep
their budgets and masks and lower their objectives, the fast versions equal the written-out
references, edits are reproducible, models round-trip through the diffusers layout, training
lowers its loss, and the metrics match independent computations."""
import numpy as np
import pytest
import torch

from kernels import photoguard as pg

SIDE = 16          # 16x16 images -> 4x8x8 latents: small enough for 2 CPU cores
SMALL = dict(block_out_channels=(16, 32), norm_num_groups=8)


def _vae(seed=0):
    return pg.tiny_vae(SIDE, 3, seed=seed, **SMALL)


def _unet(seed=1, **kw):
    return pg.tiny_inpaint_unet(SIDE // 2, num_classes=3, seed=seed, **SMALL, **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run many small ops: one thread is as fast on an idle machine and far faster
    when the two cores are shared (OpenMP threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    vae, unet = _vae(0).eval(), _unet(1).eval()
    for p in [*vae.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    return vae, unet, pg.tiny_scheduler()


@pytest.fixture(scope="module")
def models64(models):
    import copy
    vae, unet, sched = models
    return copy.deepcopy(vae).double(), copy.deepcopy(unet).double(), pg.tiny_scheduler()


def _images(n, seed=0, side=SIDE, dtype=torch.float32):
    """Smooth random images in [-1, 1] (low-frequency patterns, like natural images)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(n, 3, side, side, generator=g)).clamp(-1, 1).to(dtype)


def _masks(n, seed=0, side=SIDE, dtype=torch.float32):
    return pg.random_masks(n, side, torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------
# fast == reference

def test_encoder_attack_equals_the_reference(models64):
    vae, _, _ = models64
    x, m = _images(3, 1, dtype=torch.float64), _masks(3, 1, dtype=torch.float64)
    target = pg.encode_mean(vae, _images(1, 9, dtype=torch.float64)).detach()
    kw = dict(target_latent=target, eps=0.06, step=0.02, iters=6, mask=m)
    fast = pg.encoder_attack(vae, x, generator=torch.Generator().manual_seed(5), **kw)
    ref = pg.encoder_attack_reference(vae, x, generator=torch.Generator().manual_seed(5), **kw)
    assert (fast.image != x).any()
    torch.testing.assert_close(fast.image, ref.image, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm,eps,step,label", [("l2", 0.5, 0.2, [0, 2]), ("linf", 0.05, 0.02, None)])
def test_diffusion_attack_equals_the_reference(models64, norm, eps, step, label):
    vae, unet, sched = models64
    x, m = _images(2, 2, dtype=torch.float64), _masks(2, 2, dtype=torch.float64)
    kw = dict(label=label, eps=eps, step=step, iters=3, norm=norm, grad_reps=2, num_steps=2, guidance=3.0, eta=1.0)
    fast = pg.diffusion_attack(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(7), **kw)
    ref = pg.diffusion_attack_reference(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(7), **kw)
    assert (fast.image != x).any()
    torch.testing.assert_close(fast.image, ref.image, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-9, atol=1e-9)
    # draws split into chunks (memory) give the same result
    chunked = pg.diffusion_attack(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(7),
                                  rep_chunk=1, **kw)
    torch.testing.assert_close(chunked.image, fast.image, rtol=0, atol=1e-9)


def test_an_image_is_immunized_alike_alone_or_in_a_batch(models64):
    vae, unet, sched = models64
    x, m = _images(3, 3, dtype=torch.float64), _masks(3, 3, dtype=torch.float64)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batch = pg.diffusion_attack(vae, unet, sched, x, m, eps=0.5, step=0.2, iters=2, grad_reps=2, num_steps=2,
                                generator=gens())
    alone = pg.diffusion_attack(vae, unet, sched, x[1:2], m[1:2], eps=0.5, step=0.2, iters=2, grad_reps=2,
                                num_steps=2, generator=gens()[1:2])
    torch.testing.assert_close(batch.image[1:2], alone.image, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# budgets, masks, objectives

def test_encoder_attack_keeps_budget_and_mask_and_lowers_its_objective(models):
    vae, _, _ = models
    x, m = _images(4, 4), _masks(4, 4)
    target = pg.encode_mean(vae, torch.zeros(1, 3, SIDE, SIDE)).detach()        # a gray image's latent
    eps = 0.06
    res = pg.encoder_attack(vae, x, target, eps=eps, step=0.01, iters=40, mask=m, generator=0)
    d = res.image - x
    assert d.abs().amax() <= eps + 1e-6
    assert (d * m).abs().amax() == 0                      # nothing inside the repainted region moves
    assert (d.abs() > 0.5 * eps).float().mean() > 0.3    # the kept region does move
    assert res.image.min() >= -1 and res.image.max() <= 1
    clean = pg.encoder_objective(vae, x, target, m)
    adv = pg.encoder_objective(vae, res.image, target, m)
    assert (adv < 0.9 * clean).all(), (clean, adv)
    assert res.losses.shape == (40, 4) and (res.losses[-1] < res.losses[0]).all()
    # without a mask every pixel may move, and a zero target is the default
    res0 = pg.encoder_attack(vae, x[:1], eps=eps, step=0.01, iters=5, generator=1)
    assert (res0.image - x[:1]).abs().amax() <= eps + 1e-6
    assert pg.encoder_objective(vae, res0.image) < pg.encoder_objective(vae, x[:1])


@pytest.mark.parametrize("norm,eps,step,label", [("l2", 0.5, 0.15, 1), ("linf", 0.05, 0.015, None)])
def test_diffusion_attack_keeps_budget_and_mask_and_lowers_its_objective(models, norm, eps, step, label):
    vae, unet, sched = models
    x, m = _images(2, 5), _masks(2, 5)
    res = pg.diffusion_attack(vae, unet, sched, x, m, label=label, eps=eps, step=step, iters=8, norm=norm,
                              grad_reps=2, num_steps=2, guidance=2.0, generator=3)
    d = res.image - x
    size = d.flatten(1).norm(dim=1) if norm == "l2" else d.abs().flatten(1).amax(1)
    assert (size <= eps + 1e-5).all() and (size > 0.5 * eps).all()
    assert (d * m).abs().amax() == 0
    assert res.image.min() >= -1 and res.image.max() <= 1
    # the expected loss, on fresh noise draws common to every image compared (not the attack's
    # own draws), is lower than at the start and than after a random perturbation of the same size
    g = torch.Generator().manual_seed(0)
    r = torch.randn(x.shape, generator=g) * (1 - m)
    r = r / r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * size.reshape(-1, 1, 1, 1) if norm == "l2" \
        else r.sign() * eps
    kw = dict(label=label, reps=12, num_steps=2, guidance=2.0, generator=12345)
    clean = pg.diffusion_objective(vae, unet, sched, x, m, **kw)
    adv = pg.diffusion_objective(vae, unet, sched, res.image, m, **kw)
    rand = pg.diffusion_objective(vae, unet, sched, (x + r).clamp(-1, 1), m, **kw)
    assert (adv < clean).all() and (adv < rand).all(), (clean, rand, adv)
    assert ((clean - adv) > 2 * (clean - rand).abs()).all(), (clean, rand, adv)


# ---------------------------------------------------------------------------------------------
# editing, models on disk

def test_inpaint_is_reproducible_and_uses_the_label_and_the_kept_region(models):
    vae, unet, sched = models
    x, m = _images(2, 6), _masks(2, 6)
    kw = dict(label=[0, 2], num_steps=5, guidance=3.0, eta=1.0)
    a = pg.inpaint(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(0), **kw)
    b = pg.inpaint(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(0), **kw)
    c = pg.inpaint(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, pg.inpaint(vae, unet, sched, x, m, generator=torch.Generator().manual_seed(0),
                                            **{**kw, "label": [1, 1]}))
    # the editor sees only the kept region: changing pixels inside the mask changes nothing
    x2 = x + m * 0.5
    torch.testing.assert_close(a, pg.inpaint(vae, unet, sched, x2, m, generator=torch.Generator().manual_seed(0),
                                             **kw))
    # strength < 1 starts from the noised image and is reproducible too
    s1 = pg.inpaint(vae, unet, sched, x, m, generator=5, strength=0.6, **kw)
    assert torch.equal(s1, pg.inpaint(vae, unet, sched, x, m, generator=5, strength=0.6, **kw))
    comp = pg.composite(a, x, m)
    assert torch.equal(comp * (1 - m), x * (1 - m)) and torch.equal(comp * m, a * m)


def test_tiny_models_round_trip_through_the_diffusers_layout(models, tmp_path):
    vae, unet, sched = models
    vae = _vae(0)
    vae.register_to_config(scaling_factor=0.7)
    path = pg.save_inpainting_dir(tmp_path / "tiny", vae, unet, sched)
    assert {p.name for p in path.iterdir()} >= {"vae", "unet", "scheduler", "model_index.json"}
    vae2, unet2, sched2 = pg.load_inpainting_dir(path)
    assert type(unet2) is type(unet) and vae2.config.scaling_factor == 0.7
    x, m = _images(2, 7), _masks(2, 7)
    with torch.no_grad():
        assert torch.equal(pg.encode_mean(vae.eval(), x), pg.encode_mean(vae2, x))
    kw = dict(label=1, num_steps=4, guidance=2.0)
    torch.testing.assert_close(pg.inpaint(vae, unet, sched, x, m, generator=3, **kw),
                               pg.inpaint(vae2, unet2, sched2, x, m, generator=3, **kw), rtol=0, atol=0)


def test_a_text_conditioned_unet_runs_through_the_adapter(tmp_path):
    """A Stable-Diffusion-like checkpoint (UNet2DConditionModel, cross-attention) saved in the
    diffusers layout loads wrapped in FixedContextUNet, and the same edit and attack code runs."""
    vae = _vae(0).eval()
    unet = _unet(2, conditioning="text", cross_attention_dim=16).eval()
    path = pg.save_inpainting_dir(tmp_path / "sd_like", vae, unet, pg.tiny_scheduler())
    vae2, unet2, sched2 = pg.load_inpainting_dir(path)
    assert isinstance(unet2, pg.FixedContextUNet) and pg.null_label(unet2) is None
    assert unet2.context.shape == (1, 77, 16) and not unet2.context.any()
    x, m = _images(1, 8), _masks(1, 8)
    out = pg.inpaint(vae2, unet2, sched2, x, m, label=3, num_steps=3, generator=0)
    torch.testing.assert_close(out, pg.inpaint(vae, pg.FixedContextUNet(unet), pg.tiny_scheduler(), x, m,
                                               num_steps=3, generator=0), rtol=0, atol=0)
    res = pg.diffusion_attack(vae2, unet2, sched2, x, m, eps=0.5, step=0.2, iters=2, grad_reps=1, num_steps=2,
                              generator=0)
    ref = pg.diffusion_attack_reference(vae2, unet2, sched2, x, m, eps=0.5, step=0.2, iters=2, grad_reps=1,
                                        num_steps=2, generator=0)
    assert (res.image - x).norm() <= 0.5 + 1e-5 and ((res.image - x) * m).abs().amax() == 0
    torch.testing.assert_close(res.image, ref.image, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training

def test_train_vae_lowers_the_reconstruction_error_and_is_deterministic():
    x = _images(48, 10)
    vae = _vae(0)
    before = pg.reconstruction_mse(vae, x)
    hist = pg.train_vae(vae, x, steps=25, batch_size=16, lr=2e-3, seed=0)
    after = pg.reconstruction_mse(vae, x)
    assert after < 0.7 * before, (before, after)
    assert np.mean(hist[-5:]) < np.mean(hist[:5])
    again = _vae(0)
    assert pg.train_vae(again, x, steps=3, batch_size=16, lr=2e-3, seed=0) == hist[:3]
    factor = pg.calibrate_latent_scale(vae, x)
    assert vae.config.scaling_factor == factor
    with torch.no_grad():
        assert abs(float((pg.encode_mean(vae, x) * factor).std()) - 1) < 1e-4


def test_train_inpaint_unet_lowers_the_diffusion_loss(models):
    vae, _, sched = models
    x, y = _images(32, 11), torch.arange(32) % 3
    unet = _unet(4)
    hist = pg.train_inpaint_unet(unet, vae, sched, x, y, steps=24, batch_size=16, lr=1e-3, seed=0)
    assert len(hist) == 24 and np.isfinite(hist).all()
    assert np.mean(hist[-6:]) < 0.8 * np.mean(hist[:6]), hist
    unet2 = _unet(4)
    assert pg.train_inpaint_unet(unet2, vae, sched, x, y, steps=2, batch_size=16, lr=1e-3, seed=0) == hist[:2]


def test_random_masks_are_rectangles_inside_the_image():
    m = pg.random_masks(50, (20, 24), torch.Generator().manual_seed(0), 0.25, 0.5)
    assert m.shape == (50, 1, 20, 24) and set(m.unique().tolist()) == {0.0, 1.0}
    for k in m[:, 0]:
        rows, cols = k.any(1).nonzero().flatten(), k.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and k.sum() == h * w
        assert 5 <= h <= 10 and 6 <= w <= 12


# ---------------------------------------------------------------------------------------------
# metrics

def test_psnr_of_a_constant_offset():
    x = _images(3, 12)
    for c in (0.1, 0.02):
        y = x + c
        torch.testing.assert_close(pg.psnr(x, y), torch.full((3,), 10 * np.log10(4 / c ** 2), dtype=torch.float64))
    assert torch.isinf(pg.psnr(x, x)).all()


def _ssim_numpy(a, b, data_range=2.0, sigma=1.5):
    """An independent SSIM: scipy.ndimage Gaussian filters (truncate 3.5 -> 11 taps), border of 5
    cropped, per channel, as skimage's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)."""
    from scipy.ndimage import gaussian_filter
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for ch in range(a.shape[0]):
        x, y = a[ch].astype(np.float64), b[ch].astype(np.float64)
        f = lambda t: gaussian_filter(t, sigma, truncate=3.5)
        ux, uy = f(x), f(y)
        vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        out.append(s[5:-5, 5:-5].mean())
    return float(np.mean(out))


def test_ssim_matches_an_independent_implementation_and_its_identities():
    x = _images(3, 13, side=24)
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    ours = pg.ssim(x, y)
    ref = torch.tensor([_ssim_numpy(x[i].numpy(), y[i].numpy()) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pg.ssim(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(pg.ssim(y, x), ours)
    assert (ours < 0.9).all() and (ours > pg.ssim(x, _images(3, 99, side=24))).all()
    noisier = (x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (pg.ssim(x, noisier) < ours).all()


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))        # same eigenvectors: the covariances commute
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    assert abs(pg.frechet_distance(mu1, c1, mu2, c2) - closed) < 1e-8
    assert abs(pg.frechet_distance(mu1, c1, mu1, c1)) < 1e-8
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert abs(pg.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) - (9 + 1)) < 1e-10
    # from samples: close to the closed form of the generating Gaussians
    a = rng.multivariate_normal(mu1, c1, size=40000)
    b = rng.multivariate_normal(mu2, c2, size=40000)
    assert abs(pg.fid(a, b) - closed) < 0.05 * closed + 0.02
    assert pg.fid(torch.tensor(a), torch.tensor(a)) < 1e-6
