"""The PhotoGuard study (docs/studies.md; Salman et al. 2023, shared/reference/seeds.md section 1):
immunizing images against diffusion-based editing, on the experiment's data or the user's images.

Three stages, numerics in kernels/photoguard.py:

``photoguard_models``
    A small VAE (diffusers' AutoencoderKL) and a small class-conditioned latent inpainting UNet
    (DDIM) trained on the experiment's training split, made square at ``image_size`` with 3
    channels in [-1, 1], and saved in the diffusers layout; or, with ``photoguard.checkpoint``, a
    diffusers inpainting folder on disk (e.g. Stable Diffusion inpainting) used as it is.  A small
    classifier (kernels.models ``small_cnn`` on the training engine) supplies the features of the
    FID and the agreement of edits with the conditioning class; it is trained on the same images
    unless the study edits the user's own images with a checkpoint (no labels, no classes).
    Quality, in ``photoguard_models``: reconstruction PSNR on held-out images, and how often the
    classifier recognizes as the conditioning class a generation (the whole image repainted) and an
    inpainting (the study's mask), against chance.
``photoguard_immunize``
    ``n_images`` images (the test split, or the files of ``photoguard.images``), the mask the editor
    repaints, and three immunizations of the kept region: uniform noise at the encoder attack's
    l_inf budget (the paper's baseline), the encoder attack and the diffusion attack.  Each is
    checked against its budget and the mask; seconds per image are recorded.
``photoguard_edits``
    The clean image, the clean image under other noise (``reseed``: the editor's own spread), the
    next image's kept region under this image's mask (``swap``: how much the edit depends on the
    kept region at all), and the three immunized versions inpainted with the same noise per image,
    pasted back into the clean original outside the mask (PhotoGuard's ``recover_image``); each
    edit against the clean image's edit: PSNR, SSIM, FID on the classifier's features, and the
    classifier's agreement with the conditioning class.  Both attacks' own objectives at every
    version, on common noise (``encoder_reach``, ``diffusion_drop``).  The paper's ordering (noise <
    encoder < diffusion in how much the edit is disrupted) is checked per metric; a grid image
    shows originals, immunized images and edits.

Nothing here knows Dagster (assets/photoguard.py).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from ops.spec import Spec
from ops.store import ArtifactStore

MODELS, IMMUNIZE, EDITS = "photoguard_models", "photoguard_immunize", "photoguard_edits"
METHODS = ("noise", "encoder", "diffusion")          # immunizations, in the paper's expected order
EDITED = ("clean", "reseed", "swap", *METHODS)       # what is edited
# how each metric shows disruption of the edit (against the clean image's edit)
DIRECTION = {"psnr": "lower", "ssim": "lower", "fid": "higher", "agreement": "lower"}
# Table 1 of the paper [UNVERIFIED, shared/reference/seeds.md section 1]: compare orderings, not values
PAPER = {"fid": {"noise": 83, "encoder": 131, "diffusion": 168},
         "ssim": {"noise": 0.75, "encoder": 0.58, "diffusion": 0.50},
         "psnr": {"noise": 21, "encoder": 17, "diffusion": 16}}
Log = Callable[[str], None]

TABLES = {
    "photoguard_models": """experiment VARCHAR, model VARCHAR, source VARCHAR, params BIGINT, train_steps INTEGER,
        seconds DOUBLE, metric VARCHAR, value DOUBLE, chance DOUBLE, images INTEGER""",
    "photoguard_images": """experiment VARCHAR, image INTEGER, name VARCHAR, label INTEGER, condition INTEGER,
        method VARCHAR, psnr DOUBLE, ssim DOUBLE, predicted INTEGER, agrees BOOLEAN, linf DOUBLE, l2 DOUBLE,
        seconds DOUBLE, encoder_objective DOUBLE, diffusion_objective DOUBLE""",
    "photoguard_metrics": """experiment VARCHAR, method VARCHAR, images INTEGER, psnr DOUBLE, ssim DOUBLE, fid DOUBLE,
        agreement DOUBLE, linf DOUBLE, l2 DOUBLE, seconds_per_image DOUBLE, encoder_reach DOUBLE,
        diffusion_drop DOUBLE""",
    "photoguard_ordering": """experiment VARCHAR, metric VARCHAR, direction VARCHAR, noise DOUBLE, encoder DOUBLE,
        diffusion DOUBLE, held BOOLEAN""",
}

# random streams: one generator per image and purpose (kernels.photoguard.image_generators)
_STREAMS = {"noise": 1, "encoder": 2, "diffusion": 3, "edit": 4, "reseed": 5, "quality": 6, "objective": 7}


def _gens(spec: Spec, stream: str, n: int) -> list[torch.Generator]:
    from kernels import photoguard as pg

    return pg.image_generators(int(spec.seed) * 16 + _STREAMS[stream], n)


# ------------------------------------------------------------------ images


def to_model_images(images, side: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (C 1 or 3) -> float32 ``[N, 3, side, side]`` in [-1, 1]: gray images
    repeated to 3 channels, non-square ones cropped to their centre square, then resized (bilinear,
    antialiased) when the side differs."""
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).float().div_(127.5).sub_(1)
        x = x.permute(0, 3, 1, 2)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        h, w = x.shape[-2:]
        if h != w:
            s = min(h, w)
            x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.clamp(-1, 1).contiguous())
    return torch.cat(out) if out else torch.zeros(0, 3, side, side)


def read_image_folder(folder, side: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The image files directly in ``folder`` (sorted by name, at most ``limit``) as uint8
    ``[N, side, side, 3]``: RGB, cropped to the centre square and resized (PIL's ``ImageOps.fit``)."""
    from PIL import Image, ImageOps

    from ops.sources import IMAGE_SUFFIXES

    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:limit] if limit else files
    if not files:
        raise ValueError(f"photoguard.images: {folder} holds no image")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(np.asarray(ImageOps.fit(im.convert("RGB"), (side, side), Image.BICUBIC)))
        except OSError as e:
            raise ValueError(f"photoguard.images: {f} is not a readable image: {e}") from None
    return np.stack(out), [f.name for f in files]


def masks_for(spec: Spec, n: int) -> torch.Tensor:
    """``[n, 1, S, S]`` masks, 1 = the region the editor repaints: one centred square of side
    ``mask_frac`` (``center``), or seeded random rectangles whose sides average ``mask_frac``."""
    from kernels import photoguard as pg

    s = spec.photoguard
    side = s.image_size
    if s.mask == "random":
        lo, hi = 0.5 * s.mask_frac, min(1.0, 1.5 * s.mask_frac)
        return pg.random_masks(n, side, torch.Generator().manual_seed(int(spec.seed) * 16 + 7), lo, hi)
    k = max(1, int(round(side * s.mask_frac)))
    top = (side - k) // 2
    m = torch.zeros(n, 1, side, side)
    m[:, :, top:top + k, top:top + k] = 1.0
    return m


def _subset(n: int, k: int | None, seed: int, salt: int) -> np.ndarray:
    """A seeded choice of ``k`` of ``n`` indices (all of them for None), in sorted order."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=k, replace=False))


def _split(store: ArtifactStore, exp: str, split: str, side: int, k: int | None, seed: int, salt: int):
    from ops.data import open_loader

    f = open_loader(store, exp, split)
    if not len(f):
        return torch.zeros(0, 3, side, side), torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64)
    idx = _subset(len(f), k, seed, salt)
    x = to_model_images(np.asarray(f.array("image"))[idx], side)
    return x, torch.from_numpy(np.asarray(f.array("label"))[idx].astype(np.int64)), idx


def study_images(spec: Spec, store: ArtifactStore, exp: str):
    """The images to immunize: ``(x [n, 3, S, S], names, labels)`` (labels -1 where unknown).  The
    user's folder (sorted by file name) or a seeded choice from the test split."""
    s = spec.photoguard
    if s.images is not None:
        u8, names = read_image_folder(s.images, s.image_size, s.n_images)
        return to_model_images(u8, s.image_size), names, np.full(len(names), -1, np.int64)
    x, y, idx = _split(store, exp, "test", s.image_size, s.n_images, spec.seed, 171)
    if len(x) < 2:
        raise ValueError(f"photoguard.n_images: the test split has {len(x)} image(s); the study needs at least 2")
    return x, [f"test/{i}" for i in idx], y.numpy()


# ------------------------------------------------------------------ models


def _groups(channels) -> int:
    return 16 if all(c % 16 == 0 for c in channels) else 8


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _dtype(spec: Spec) -> torch.dtype:
    return getattr(torch, spec.photoguard.dtype)


def _check_sizes(vae, unet, side: int) -> list[int]:
    """The latent shape ``[c, h, w]`` of ``side`` images; refuses a side the models cannot take."""
    from kernels import photoguard as pg

    f_vae = 2 ** (len(vae.config.block_out_channels) - 1)
    f_unet = 2 ** (len(pg._inner(unet).config.block_out_channels) - 1)
    if side % (f_vae * f_unet):
        raise ValueError(f"photoguard.image_size: {side} is not a multiple of {f_vae * f_unet} (the VAE divides the "
                         f"side by {f_vae}, the UNet the latents' by {f_unet})")
    return [int(vae.config.latent_channels), side // f_vae, side // f_vae]


def load_models(spec: Spec, store: ArtifactStore, exp: str, device):
    """``(vae, unet, scheduler)`` the study uses: the checkpoint's, or those ``photoguard_models``
    trained; frozen (no parameter gradients), in eval mode, in ``photoguard.dtype``."""
    from kernels import photoguard as pg

    s = spec.photoguard
    path = s.checkpoint or store.require(exp, MODELS, "model")
    context = None
    if s.context is not None:
        context = torch.from_numpy(np.load(s.context)).to(_dtype(spec))
        if context.ndim == 2:
            context = context[None]
    vae, unet, sched = pg.load_inpainting_dir(path, torch_dtype=_dtype(spec), device=device, context=context,
                                              variant=s.variant if s.checkpoint else None)
    for p in [*vae.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    return vae.eval(), unet.eval(), sched


def _classifier_make(spec: Spec, classes: int):
    from kernels.models import build_model

    side = spec.photoguard.image_size
    return lambda: build_model("small_cnn", (3, side, side), classes, spec.photoguard.classifier_hidden)


def load_classifier(spec: Spec, store: ArtifactStore, exp: str, device):
    """The study's classifier, or None where it was not trained (a checkpoint and the user's images)."""
    if not store.path(exp, MODELS, "classifier.safetensors").exists():
        return None
    tensors, meta = store.load_tensors(exp, MODELS, "classifier.safetensors")
    model = _classifier_make(spec, int(meta["classes"]))()
    model.load_state_dict(tensors)
    return model.to(device).eval()


@torch.no_grad()
def classify(clf, x: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and penultimate features (the last convolution's channels, averaged over
    positions) of images in [-1, 1]."""
    p = next(clf.parameters())
    preds, feats = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device=p.device, dtype=torch.float32).contiguous()
        e = clf.embed(xb)
        preds.append(clf.out(e).argmax(-1).cpu())
        side = xb.shape[-1] // 4
        feats.append(e.reshape(len(xb), -1, side, side).mean((2, 3)).float().cpu())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def _label_arg(unet, conds) -> torch.Tensor | None:
    """Per-image labels for the kernels: the conditioning class, or the null class where it is -1;
    None for a UNet that ignores labels."""
    from kernels import photoguard as pg

    null = pg.null_label(unet)
    if null is None:
        return None
    c = torch.as_tensor(np.asarray(conds), dtype=torch.long)
    return torch.where(c < 0, torch.full_like(c, null), c)


def _batched(fn, n: int, batch: int, log: Log | None = None, what: str = ""):
    """``fn(slice)`` over batches of images; returns the results and each image's seconds (its
    batch's time over its size)."""
    outs, secs = [], np.zeros(n)
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        t0 = time.perf_counter()
        outs.append(fn(sl))
        dt = time.perf_counter() - t0
        secs[sl] = dt / (sl.stop - sl.start)
        if log is not None:
            log(f"{what}: images {sl.start}-{sl.stop - 1} of {n}, {dt / (sl.stop - sl.start):.2f} s per image")
    return outs, secs


def _inpaint(spec: Spec, vae, unet, sched, x, masks, conds, gens, batch: int):
    """Edits of ``x`` pasted back into ``x`` outside the mask (PhotoGuard's ``recover_image``)."""
    from kernels import photoguard as pg

    e = spec.photoguard.edit
    labels = _label_arg(unet, conds)

    def one(sl):
        out = pg.inpaint(vae, unet, sched, x[sl], masks[sl], label=None if labels is None else labels[sl],
                         num_steps=e.num_steps, guidance=e.guidance, eta=e.eta, generator=gens[sl],
                         strength=e.strength)
        return pg.composite(out.float().cpu(), x[sl].float().cpu(), masks[sl].float().cpu())

    with torch.no_grad():
        outs, secs = _batched(one, len(x), batch)
    return torch.cat(outs), secs


def photoguard_models(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from kernels import photoguard as pg
    from kernels.train import Recipe, train_stacked
    from ops.training import model_seed

    s = spec.photoguard
    side = s.image_size
    device = torch.device(device)
    classes = len(store.load_json(exp, "training_set", "meta.json")["classes"])
    train_classifier = not (s.checkpoint and s.images)
    need_train = s.checkpoint is None or train_classifier
    rows, meta = [], {"image_size": side, "classes": classes, "checkpoint": s.checkpoint}
    if isinstance(s.condition, int) and s.condition >= classes:
        raise ValueError(f"photoguard.condition: class {s.condition} does not exist ({classes} classes)")
    x = y = None
    if need_train:
        x, y, _ = _split(store, exp, "train", side, s.train_images, spec.seed, 172)
        log(f"{len(x)} training images at {side}x{side}")
    if s.checkpoint and s.images:
        u8, _ = read_image_folder(s.images, side, s.quality_images)
        xq, yq = to_model_images(u8, side), None
    else:
        xq, yq, _ = _split(store, exp, "test", side, s.quality_images, spec.seed, 173)
    seed = model_seed(spec, 900_000)
    history = {}
    if s.checkpoint:
        vae, unet, sched = load_models(spec, store, exp, device)
        source, vae_steps, unet_steps, vae_secs, unet_secs = "checkpoint", 0, 0, 0.0, 0.0
        shutil.rmtree(store.path(exp, MODELS, "model"), ignore_errors=True)     # models an earlier run trained
        log(f"models from {s.checkpoint} (nothing trained)")
    else:
        source = "trained"
        vae = pg.tiny_vae(side, 3, block_out_channels=s.vae_channels, norm_num_groups=_groups(s.vae_channels),
                          seed=seed).to(device=device)
        latent = side // 2 ** (len(s.vae_channels) - 1)
        unet = pg.tiny_inpaint_unet(latent, num_classes=classes, block_out_channels=s.unet_channels,
                                    norm_num_groups=_groups(s.unet_channels), seed=seed + 1).to(device=device)
        sched = pg.tiny_scheduler()
        _check_sizes(vae, unet, side)
        every = max(1, s.vae_steps // 10)
        t0 = time.perf_counter()
        history["vae"] = pg.train_vae(vae, x, s.vae_steps, batch_size=s.batch_size, lr=s.vae_lr, seed=seed,
                                      progress=lambda i, v: (i + 1) % every or log(f"VAE step {i + 1}: mse {v:.4f}"))
        pg.calibrate_latent_scale(vae, x[:4096])
        vae_secs = time.perf_counter() - t0
        every = max(1, s.unet_steps // 10)
        t0 = time.perf_counter()
        history["unet"] = pg.train_inpaint_unet(
            unet, vae, sched, x, y, s.unet_steps, batch_size=s.batch_size, lr=s.unet_lr, seed=seed + 1,
            progress=lambda i, v: (i + 1) % every or log(f"UNet step {i + 1}: loss {v:.4f}"))
        unet_secs = time.perf_counter() - t0
        vae_steps, unet_steps = s.vae_steps, s.unet_steps
        _save_dir(store, exp, vae, unet, sched)
        vae, unet, sched = load_models(spec, store, exp, device)     # as the later stages will see them
    latent_shape = _check_sizes(vae, unet, side)
    conditional = pg.null_label(unet) is not None
    if conditional and pg.null_label(unet) != classes:
        raise ValueError(f"photoguard.checkpoint: its UNet has {pg.null_label(unet)} classes (+1 null), the "
                         f"experiment {classes}")
    meta.update(source=source, latent_shape=latent_shape, conditional=conditional,
                vae_params=_params(vae), unet_params=_params(unet), scaling_factor=pg.latent_scale(vae))

    clf = None
    if train_classifier:
        make = _classifier_make(spec, classes)
        recipe = Recipe(epochs=s.classifier_epochs, batch_size=64, lr=0.05)
        t0 = time.perf_counter()
        params = train_stacked(make, x.to(device), y.to(device), [np.arange(len(x))], [seed + 2], recipe,
                               on_epoch=lambda e, loss: log(f"classifier epoch {e + 1}: loss {loss:.4f}"))
        clf_secs = time.perf_counter() - t0
        state = {k: v[0].contiguous() for k, v in params.items()}
        store.save_tensors(exp, MODELS, "classifier.safetensors", state,
                           {"arch": "small_cnn", "hidden": s.classifier_hidden, "classes": classes, "image_size": side})
        clf = load_classifier(spec, store, exp, device)
        acc = float((classify(clf, xq)[0] == yq.numpy()).mean())
        rows.append(dict(model="classifier", source="trained", params=_params(clf), train_steps=s.classifier_epochs,
                         seconds=clf_secs, metric="test_accuracy", value=acc, chance=1 / classes, images=len(xq)))
        log(f"classifier: test accuracy {acc:.3f} on {len(xq)} held-out images")
    elif store.path(exp, MODELS, "classifier.safetensors").exists():
        store.path(exp, MODELS, "classifier.safetensors").unlink()
    meta["classifier"] = clf is not None

    with torch.no_grad():
        p = next(vae.parameters())
        rec = torch.cat([vae.decode(pg.encode_mean(vae, xq[i:i + 64].to(p.device, p.dtype))).sample.float().cpu()
                         for i in range(0, len(xq), 64)]).clamp(-1, 1)
    rec_psnr = float(pg.psnr(rec, xq).mean())
    rows.insert(0, dict(model="vae", source=source, params=_params(vae), train_steps=vae_steps, seconds=vae_secs,
                        metric="reconstruction_psnr", value=rec_psnr, chance=None, images=len(xq)))
    log(f"VAE: reconstruction PSNR {rec_psnr:.2f} dB on {len(xq)} held-out images")
    gen = inp = None
    if clf is not None:
        n = len(xq)
        cond = np.arange(n) % classes
        full = torch.ones(n, 1, side, side)
        out, _ = _inpaint(spec, vae, unet, sched, xq, full, cond, _gens(spec, "quality", n), s.batch)
        gen = float((classify(clf, out)[0] == cond).mean())
        m = masks_for(spec, n)
        out, _ = _inpaint(spec, vae, unet, sched, xq, m, yq.numpy(), _gens(spec, "quality", n), s.batch)
        inp = float((classify(clf, out)[0] == yq.numpy()).mean())
        log(f"UNet: generations recognized as their class {gen:.3f}, inpaintings {inp:.3f} (chance {1 / classes:.3f})"
            + ("" if conditional else "; the UNet ignores class labels"))
    for metric, value in (("generation_agreement", gen), ("inpaint_agreement", inp)):
        rows.insert(1 if metric == "generation_agreement" else 2,
                    dict(model="unet", source=source, params=_params(unet), train_steps=unet_steps, seconds=unet_secs,
                         metric=metric, value=value, chance=1 / classes if clf is not None else None,
                         images=len(xq)))
    table = pl.DataFrame(rows, schema={"model": pl.String, "source": pl.String, "params": pl.Int64,
                                       "train_steps": pl.Int32, "seconds": pl.Float64, "metric": pl.String,
                                       "value": pl.Float64, "chance": pl.Float64, "images": pl.Int32})
    store.save_table(exp, MODELS, "photoguard_models.parquet", table.select(pl.lit(exp).alias("experiment"), pl.all()))
    if history:
        plot_training(history, store.path(exp, MODELS, "training.png"))
    meta["quality"] = {"reconstruction_psnr": rec_psnr, "generation_agreement": gen, "inpaint_agreement": inp,
                       "chance": 1 / classes}
    store.save_json(exp, MODELS, "meta.json", meta)
    return meta


def _save_dir(store: ArtifactStore, exp: str, vae, unet, sched) -> Path:
    """The trained models in the diffusers layout under ``photoguard_models/model`` (written next
    to it, then renamed into place)."""
    from kernels import photoguard as pg

    dest = store.path(exp, MODELS, "model")
    tmp = store.path(exp, MODELS, ".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pg.save_inpainting_dir(tmp, vae, unet, sched)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _conditions(spec: Spec, labels: np.ndarray) -> np.ndarray:
    c = spec.photoguard.condition
    return labels.copy() if c == "own" else np.full(len(labels), int(c), np.int64)


def photoguard_immunize(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from kernels import photoguard as pg

    s = spec.photoguard
    vae, unet, sched = load_models(spec, store, exp, device)
    x, names, labels = study_images(spec, store, exp)
    n = len(x)
    masks = masks_for(spec, n)
    conds = _conditions(spec, labels)
    p = next(vae.parameters())
    xd, md = x.to(p.device, p.dtype), masks.to(p.device, p.dtype)
    out, secs, losses = {}, {}, {}

    t0 = time.perf_counter()
    out["noise"] = pg.noise_immunize(xd, eps=s.noise_budget, mask=md, generator=_gens(spec, "noise", n))
    secs["noise"] = np.full(n, (time.perf_counter() - t0) / n)

    e = s.encoder
    target = _encoder_target(vae, xd, e.target)
    gens = _gens(spec, "encoder", n)
    res, secs["encoder"] = _batched(
        lambda sl: pg.encoder_attack(vae, xd[sl], target, eps=e.eps, step=e.step, iters=e.iters, mask=md[sl],
                                     generator=gens[sl]), n, s.batch, log, "encoder attack")
    out["encoder"] = torch.cat([r.image for r in res])
    losses["encoder"] = torch.cat([r.losses for r in res], 1)

    d = s.diffusion
    labels_arg = _label_arg(unet, conds) if d.label == "condition" else None
    gens = _gens(spec, "diffusion", n)
    res, secs["diffusion"] = _batched(
        lambda sl: pg.diffusion_attack(vae, unet, sched, xd[sl], md[sl],
                                       label=None if labels_arg is None else labels_arg[sl],
                                       eps=s.diffusion_eps, step=s.diffusion_step, iters=d.iters, norm=d.norm,
                                       grad_reps=d.grad_reps, num_steps=d.num_steps, guidance=d.guidance, eta=d.eta,
                                       generator=gens[sl], rep_chunk=d.rep_chunk), n, s.batch, log, "diffusion attack")
    out["diffusion"] = torch.cat([r.image for r in res])
    losses["diffusion"] = torch.cat([r.losses for r in res], 1)

    budgets = {"noise": ("linf", s.noise_budget), "encoder": ("linf", e.eps), "diffusion": (d.norm, s.diffusion_eps)}
    tol = 1e-5 if p.dtype == torch.float32 else 1e-2
    checks = {}
    store.save_npy(exp, IMMUNIZE, "clean.npy", x.numpy())
    for m in METHODS:
        delta = out[m].float().cpu() - x
        size = _size(delta, budgets[m][0])
        outside = float((delta * masks).abs().amax())
        ok = bool((size <= budgets[m][1] * (1 + tol) + tol).all()) and outside == 0.0
        checks[m] = {"norm": budgets[m][0], "eps": budgets[m][1], "max": float(size.max()), "inside_mask": outside,
                     "within": ok}
        if not ok:
            raise RuntimeError(f"photoguard: the {m} immunization leaves its budget or touches the mask: {checks[m]}")
        store.save_npy(exp, IMMUNIZE, f"{m}.npy", out[m].float().cpu().numpy())
        if m in losses:
            store.save_npy(exp, IMMUNIZE, f"{m}_losses.npy", losses[m].float().cpu().numpy())
    store.save_npy(exp, IMMUNIZE, "masks.npy", masks.numpy())
    store.save_npy(exp, IMMUNIZE, "labels.npy", labels)
    store.save_npy(exp, IMMUNIZE, "conditions.npy", conds)
    store.save_json(exp, IMMUNIZE, "images.json", {"names": names, "seconds": {m: v.tolist() for m, v in secs.items()},
                                                   "budgets": checks})
    objective = {"encoder": [float(losses["encoder"][0].mean()), float(losses["encoder"][-1].mean())],
                 "diffusion": [float(losses["diffusion"][0].mean()), float(losses["diffusion"][-1].mean())]}
    log("seconds per image: " + ", ".join(f"{m} {secs[m].mean():.3f}" for m in METHODS))
    return {"images": n, "source": s.images or "test split", "mask": f"{s.mask} {s.mask_frac:g}",
            "seconds_per_image": {m: float(secs[m].mean()) for m in METHODS}, "budgets": checks,
            "objective_first_last": objective}


@torch.no_grad()
def _encoder_target(vae, like: torch.Tensor, target: str) -> torch.Tensor | None:
    """The encoder attack's target latent: the encoding of a gray image (app.py), or None for 0."""
    from kernels import photoguard as pg

    return pg.encode_mean(vae, torch.zeros_like(like[:1])) if target == "gray" else None


def attack_objectives(spec: Spec, vae, unet, sched, versions: dict, masks: torch.Tensor, conds) -> dict:
    """Each version's value of both attacks' own objectives, per image: the encoder attack's
    ``||E(x' * (1 - mask)) - z_t||`` and the diffusion attack's ``mean_r ||f_r(x') - target||``
    over ``diffusion.grad_reps`` draws of its few-step loop, with the same draws for every version
    (common random numbers, so the versions differ only by their pixels).  How far an attack got
    on its own objective tells a weak attack (it barely moved) from a weak effect on the edit (it
    moved, and the edit did not follow)."""
    from kernels import photoguard as pg

    s = spec.photoguard
    d = s.diffusion
    p = next(vae.parameters())
    md = masks.to(p.device, p.dtype)
    target = _encoder_target(vae, versions["clean"].to(p.device, p.dtype), s.encoder.target)
    labels = _label_arg(unet, conds) if d.label == "condition" else None
    out = {}
    for m, v in versions.items():
        v = v.to(p.device, p.dtype)
        gens = _gens(spec, "objective", len(v))            # fresh, identical draws for every version
        enc, dif = [], []
        for i in range(0, len(v), s.batch):
            sl = slice(i, i + s.batch)
            enc.append(pg.encoder_objective(vae, v[sl], target, md[sl]).float().cpu())
            dif.append(pg.diffusion_objective(vae, unet, sched, v[sl], md[sl],
                                              label=None if labels is None else labels[sl], reps=d.grad_reps,
                                              num_steps=d.num_steps, guidance=d.guidance, eta=d.eta,
                                              generator=gens[sl]).float().cpu())
        out[m] = (torch.cat(enc).numpy(), torch.cat(dif).numpy())
    return out


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def photoguard_edits(spec: Spec, store: ArtifactStore, exp: str, device, log: Log = lambda _: None) -> dict:
    from kernels import photoguard as pg

    s = spec.photoguard
    vae, unet, sched = load_models(spec, store, exp, device)
    clf = load_classifier(spec, store, exp, device)
    load = lambda name: store.load_npy(exp, IMMUNIZE, f"{name}.npy", mmap=False)   # noqa: E731
    x, masks = torch.from_numpy(load("clean")).float(), torch.from_numpy(load("masks")).float()
    labels, conds = load("labels"), load("conditions")
    info = store.load_json(exp, IMMUNIZE, "images.json")
    n = len(x)
    # swap: the next image's kept region under this image's mask, noise and class -- how much the
    # edit depends on the kept region at all (what replacing it outright does)
    versions = {"clean": x, "reseed": x, "swap": x.roll(1, 0)}
    versions.update({m: torch.from_numpy(load(m)).float() for m in METHODS})
    p = next(vae.parameters())
    edits, edit_secs = {}, {}
    for m in EDITED:
        gens = _gens(spec, "reseed" if m == "reseed" else "edit", n)
        out, sec = _inpaint(spec, vae, unet, sched, versions[m].to(p.device, p.dtype), masks.to(p.device, p.dtype),
                            conds, gens, s.batch)
        edits[m] = pg.composite(out, x, masks)        # the clean original outside the mask
        edit_secs[m] = float(sec.mean())
        store.save_npy(exp, EDITS, f"edit_{m}.npy", edits[m].numpy())
        log(f"edited the {m} images ({edit_secs[m]:.2f} s per image)")
    ref = edits["clean"]
    objectives = attack_objectives(spec, vae, unet, sched, {m: versions[m] for m in ("clean", *METHODS)}, masks,
                                   conds)
    enc0, dif0 = objectives["clean"]
    pred, feats = {}, {}
    if clf is not None:
        for m in EDITED:
            pred[m], feats[m] = classify(clf, edits[m])
    rows = []
    for m in EDITED:
        delta = versions[m] - x
        ps = None if m == "clean" else pg.psnr(edits[m], ref).numpy()
        ss = None if m == "clean" else pg.ssim(edits[m], ref).numpy()
        sec = info["seconds"].get(m)
        enc, dif = objectives.get(m, (None, None))
        for i in range(n):
            agrees = None if (clf is None or conds[i] < 0) else bool(pred[m][i] == conds[i])
            rows.append({"image": i, "name": info["names"][i], "label": None if labels[i] < 0 else int(labels[i]),
                         "condition": None if conds[i] < 0 else int(conds[i]), "method": m,
                         "psnr": None if ps is None else float(ps[i]), "ssim": None if ss is None else float(ss[i]),
                         "predicted": None if clf is None else int(pred[m][i]), "agrees": agrees,
                         "linf": float(delta[i].abs().max()), "l2": float(delta[i].norm()),
                         "seconds": None if sec is None else float(sec[i]),
                         "encoder_objective": None if enc is None else float(enc[i]),
                         "diffusion_objective": None if dif is None else float(dif[i]),
                         "_reach": None if enc is None else float(1 - enc[i] / max(enc0[i], 1e-12)),
                         "_drop": None if dif is None else float(1 - dif[i] / max(dif0[i], 1e-12))})
    images = pl.DataFrame(rows, schema={"image": pl.Int32, "name": pl.String, "label": pl.Int32,
                                        "condition": pl.Int32, "method": pl.String, "psnr": pl.Float64,
                                        "ssim": pl.Float64, "predicted": pl.Int32, "agrees": pl.Boolean,
                                        "linf": pl.Float64, "l2": pl.Float64, "seconds": pl.Float64,
                                        "encoder_objective": pl.Float64, "diffusion_objective": pl.Float64,
                                        "_reach": pl.Float64, "_drop": pl.Float64})
    fids = {m: (_fid(feats[m], feats["clean"]) if clf is not None and m != "clean" else None) for m in EDITED}
    metrics = (images.group_by("method", maintain_order=True)
               .agg(pl.len().cast(pl.Int32).alias("images"), pl.col("psnr").mean(), pl.col("ssim").mean(),
                    pl.col("agrees").cast(pl.Float64).mean().alias("agreement"), pl.col("linf").max(),
                    pl.col("l2").mean(), pl.col("seconds").mean().alias("seconds_per_image"),
                    pl.col("_reach").mean().alias("encoder_reach"), pl.col("_drop").mean().alias("diffusion_drop"))
               .with_columns(fid=pl.col("method").replace_strict(fids, return_dtype=pl.Float64))
               .select("method", "images", "psnr", "ssim", "fid", "agreement", "linf", "l2", "seconds_per_image",
                       "encoder_reach", "diffusion_drop"))
    images = images.drop("_reach", "_drop")
    ordering = check_ordering(metrics)
    for name, df in (("photoguard_images", images), ("photoguard_metrics", metrics), ("photoguard_ordering", ordering)):
        store.save_table(exp, EDITS, f"{name}.parquet", df.select(pl.lit(exp).alias("experiment"), pl.all()))
    verdict = ordering_verdict(ordering)
    verdict["attacks"] = attack_summary(metrics)
    verdict["summary"] += "; " + verdict["attacks"]
    store.save_json(exp, EDITS, "ordering.json", verdict)
    plot_grid(versions, edits, masks, info["names"], store.path(exp, EDITS, "grid.png"))
    log(verdict["summary"])
    return {"images": n, "ordering": verdict, "edit_seconds_per_image": edit_secs, "classifier": clf is not None}


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets; with fewer images than feature dimensions the covariances are
    singular, and where the matrix square root comes out complex both get a small ridge
    (1e-6, then 1e-3 of their mean variance) before it is given up."""
    from kernels import photoguard as pg

    try:
        return pg.fid(a, b)
    except ValueError:
        pass
    (m1, s1), (m2, s2) = pg.feature_stats(a), pg.feature_stats(b)
    scale = max(float(np.trace(s1) + np.trace(s2)) / (2 * len(s1)), 1e-12)
    for ridge in (1e-6, 1e-3):
        eye = np.eye(len(s1)) * ridge * scale
        try:
            return pg.frechet_distance(m1, s1 + eye, m2, s2 + eye)
        except ValueError:
            continue
    return float("nan")


def check_ordering(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per metric, the immunizations' values and whether noise < encoder < diffusion in how much
    they disrupt the edit (strictly; lower PSNR / SSIM / agreement, higher FID is more disrupted)."""
    by = {r["method"]: r for r in metrics.iter_rows(named=True)}
    rows = []
    for metric, direction in DIRECTION.items():
        vals = [by[m][metric] if m in by else None for m in METHODS]
        if any(v is None or v != v for v in vals):
            continue
        sign = -1 if direction == "lower" else 1
        held = all(sign * a < sign * b for a, b in zip(vals, vals[1:]))
        rows.append({"metric": metric, "direction": direction, **dict(zip(METHODS, vals)), "held": held})
    return pl.DataFrame(rows, schema={"metric": pl.String, "direction": pl.String, "noise": pl.Float64,
                                      "encoder": pl.Float64, "diffusion": pl.Float64, "held": pl.Boolean})


def ordering_verdict(ordering: pl.DataFrame) -> dict:
    held = [r["metric"] for r in ordering.iter_rows(named=True) if r["held"]]
    missed = [r["metric"] for r in ordering.iter_rows(named=True) if not r["held"]]
    detail = []
    for r in ordering.iter_rows(named=True):
        if not r["held"]:
            key = lambda m: r[m] * (-1 if r["direction"] == "lower" else 1)   # noqa: E731  disruption
            ranked = sorted(METHODS, key=key)
            text = ranked[0]
            for a, b in zip(ranked, ranked[1:]):
                text += (" = " if key(a) == key(b) else " < ") + b
            detail.append(f"{r['metric']}: {text}")
    summary = ("the paper's ordering (noise < encoder < diffusion in disruption of the edit) "
               + ("held on every metric" if not missed else
                  f"held on {', '.join(held) or 'no metric'}; not on {', '.join(missed)} (there: {'; '.join(detail)})"))
    return {"held": held, "not_held": missed, "all_held": not missed and bool(held), "detail": detail,
            "summary": summary, "paper_unverified": PAPER}


def attack_summary(metrics: pl.DataFrame) -> str:
    """How far each attack got on its own objective, and how much the edit depends on the kept
    region at all (the ``swap`` version), in one line."""
    by = {r["method"]: r for r in metrics.iter_rows(named=True)}
    parts = []
    if "encoder" in by and by["encoder"]["encoder_reach"] is not None:
        parts.append(f"the encoder attack moved the latent {100 * by['encoder']['encoder_reach']:.1f}% of the way "
                     "to its target")
    if "diffusion" in by and by["diffusion"]["diffusion_drop"] is not None:
        parts.append(f"the diffusion attack lowered its objective by {100 * by['diffusion']['diffusion_drop']:.1f}%")
    for m in ("swap", "reseed"):
        if m in by and by[m]["psnr"] is not None:
            what = "another image's kept region" if m == "swap" else "other noise"
            parts.append(f"{what} puts the edit {by[m]['psnr']:.1f} dB from the clean edit")
    return "; ".join(parts)


def _show(img: torch.Tensor) -> np.ndarray:
    return ((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def plot_grid(versions: dict, edits: dict, masks: torch.Tensor, names: list[str], dest, columns: int = 6) -> Path:
    """Rows: the original (the repainted region outlined), each immunized image, then the edit of
    each; one column per image (the first ``columns``)."""
    from ops.plots import save

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(columns, len(masks))
    rows = [("original", versions["clean"])] + [(f"{m}-immunized", versions[m]) for m in METHODS] + \
        [("edit of original", edits["clean"])] + [(f"edit of {m}", edits[m]) for m in METHODS]
    fig, axes = plt.subplots(len(rows), k, figsize=(1.25 * k + 1.3, 1.25 * len(rows)), dpi=100, squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(_show(imgs[c]), interpolation="nearest")
            if r == 0:
                ax.contour(masks[c, 0].numpy(), levels=[0.5], colors="red", linewidths=0.7)
                ax.set_title(names[c][-14:], fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    return save(fig, dest)


def plot_training(history: dict, dest) -> Path:
    """The VAE's reconstruction MSE and the UNet's noise-prediction loss during training (moving means)."""
    from ops.plots import figure, save

    fig, axes = figure((7.5, 2.8), ncols=2)
    for ax, (name, what) in zip(axes, (("vae", "VAE reconstruction MSE"), ("unet", "UNet noise MSE"))):
        h = np.asarray(history.get(name, []), float)
        if len(h):
            w = max(1, len(h) // 50)
            ax.plot(np.convolve(h, np.ones(w) / w, mode="valid"), color="C0")
            ax.set_yscale("log")
        ax.set_title(what, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save(fig, dest)
