"""PhotoGuard (Salman et al. 2023, arXiv 2302.06588): immunizing images against diffusion-based
editing, scaled down to tiny latent-diffusion models that train and run on a CPU.

Numerics only: plain functions over torch tensors and diffusers models (no Dagster, no store, no
spec).  Pixels are in [-1, 1] throughout; masks are ``[n, 1, H, W]`` with **1 = the region the
editor repaints** and 0 = the region that is kept (as in diffusers' inpainting pipelines and in
PhotoGuard after its ``ImageOps.invert``).  Immunization only ever perturbs the kept region.

Models (diffusers classes, random init, never the hub)
    ``tiny_vae`` (AutoencoderKL), ``tiny_inpaint_unet`` (a 9-channel latent inpainting UNet:
    4 noisy latents + 1 mask + 4 masked-image latents), ``tiny_scheduler`` (DDIM).  The tiny UNet
    is conditioned on a class label: a ``UNet2DModel`` whose ``num_class_embeds`` embedding (one
    row per class plus a last *null* row for classifier-free guidance) is added to the timestep
    embedding -- the simplest honest replacement for CLIP text (a text encoder needs tokenizer
    files and weights we cannot load offline).  ``conditioning="text"`` builds instead a
    ``UNet2DConditionModel`` with cross-attention, laid out like Stable Diffusion's, to exercise the
    adapter below.  ``save_inpainting_dir`` / ``load_inpainting_dir`` use the diffusers directory
    layout (``vae/``, ``unet/``, ``scheduler/``), so the same loader opens a real Stable Diffusion
    inpainting checkpoint.  A text-conditioned UNet is wrapped in ``FixedContextUNet``: without a
    text encoder it is driven with one fixed context (zeros of the UNet's ``cross_attention_dim``
    by default, or a saved embedding), so conditional == unconditional and guidance is a no-op.

Training (``train_vae``, ``calibrate_latent_scale``, ``train_inpaint_unet``)
    Small deterministic loops: reconstruction + small KL for the autoencoder; the usual
    epsilon-prediction loss on scaled latents with random rectangular masks (25 % of them the whole
    image, as for SD-inpainting), masked-image latents, and label dropout to the null class.

Editing (``inpaint``)
    The DDIM inpainting loop of diffusers' StableDiffusionInpaintPipeline for a 9-channel UNet:
    masked image = image * (mask < 0.5), masked-image latents = scale * a posterior *sample*,
    mask at latent resolution (nearest), classifier-free guidance against the null class, decode.
    The result is **not** composited (like the pipeline's output); ``composite`` pastes the kept
    region back, as PhotoGuard's ``recover_image`` does before showing an edit.

Attacks (MadryLab/photoguard @686bea7, see /work/shared/reference/seeds.md section 1)
    ``encoder_attack``: l_inf PGD towards a target latent, ``min ||E(x+d) - z_t||_2`` with
    ``E = vae.encode(.).latent_dist.mean``, uniform start in [-eps, eps], sign steps with linear
    decay ``a_i = a - (a - a/100) i/T``, box projection, clamp to [-1, 1], d * (1 - mask).
    ``diffusion_attack``: PGD through a differentiable copy of the inpainting loop (few DDIM steps,
    eta 1, guidance 7.5), ``loss = ||f(x_adv) - x_target||_2`` with x_target = 0, gradient times
    (1 - mask), averaged over ``grad_reps`` random draws (EOT); l2: constant step on the normalized
    gradient, projection by renorm; l_inf: constant sign step, box projection (the step decay is
    commented out in the notebook for both).  Each has a plain ``*_reference`` version (one image
    at a time, one UNet call per guidance branch, one EOT draw per forward pass) and the fast
    version (all images and all EOT draws in one batch, the encoder run once per image and
    iterate, both guidance branches in one UNet call, the unconditional branch dropped when it
    equals the conditional one); tests check they agree.

Randomness: every image has its own ``torch.Generator`` (``image_generators``), drawn on the CPU,
so an image's random start, EOT noise and edit noise are the same whether it is processed alone
or in a batch, and whether the fast or the reference code consumes them.

Metrics: ``psnr``, ``ssim`` (Gaussian window 11, sigma 1.5, as skimage with
``gaussian_weights=True, use_sample_covariance=False`` and torchmetrics), ``frechet_distance`` /
``fid`` over feature vectors (scipy ``sqrtm``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel

# ---------------------------------------------------------------------------------------------
# Defaults.  Paper/code settings for 512 px Stable Diffusion, scaled to 32 px images on a 2-core
# CPU.  l_inf budgets are per pixel and keep their values; the l2 budget and step scale with the
# image side (sqrt of the number of pixels): 16 * 32/512 = 1, step 1 * 32/512 = 0.0625.  Iteration
# counts and EOT draws are cut for the CPU.  Measured on the 2-core CPU VM (torch 2.14.1, 2 threads,
# 32x32 images, tiny_vae + tiny_inpaint_unet at their defaults, other jobs sharing the cores, so
# upper-boundish): encoder attack 8 ms per iteration for one image, 3 ms per image in batches of 8
# (T=200: 1.6 s / 0.6 s per image); diffusion attack (4 draws x 4 DDIM steps) 0.14 s per iteration
# for one image, 0.10 s per image in batches of 4, 0.15-0.21 s with a class label (guidance runs
# two branches) -> 5-10 s per image at 50 iterations; the reference versions 0.37 / 0.61 s per
# iteration.  An edit (100 guided DDIM steps) about 0.5 s per image.
# ---------------------------------------------------------------------------------------------
DEFAULTS = {
    # inpainting notebook: eps 0.06, step 0.01, 1000 iterations (app.py: eps 0.12, 200)
    "encoder": {"eps": 0.06, "step": 0.01, "iters": 200},
    # complex-attack notebook: l2 eps 16, step 1, 200 iterations, grad_reps 10, 4 DDIM steps,
    # guidance 7.5, eta 1; scaled: eps 1, step 0.0625; CPU: 50 iterations, 4 EOT draws
    "diffusion_l2": {"norm": "l2", "eps": 1.0, "step": 0.0625, "iters": 50, "grad_reps": 4,
                     "num_steps": 4, "guidance": 7.5, "eta": 1.0},
    # notebook alternative: l_inf eps 0.1, step 0.006, 200 iterations
    "diffusion_linf": {"norm": "linf", "eps": 0.1, "step": 0.006, "iters": 50, "grad_reps": 4,
                       "num_steps": 4, "guidance": 7.5, "eta": 1.0},
    # edits: app.py ("params we used all over the paper"): guidance 7.5, 100 steps, eta 1
    "edit": {"num_steps": 100, "guidance": 7.5, "eta": 1.0},
    # noise baseline of the paper's table: uniform noise at eps 16/255 on a [0, 1] scale
    "noise_eps": 2 * 16 / 255,
}

NORMS = ("l2", "linf")


# =============================================================================================
# Models
# =============================================================================================

def tiny_vae(image_size: int = 32, channels: int = 3, latent_channels: int = 4,
             block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
             norm_num_groups: int = 16, seed: int = 0) -> AutoencoderKL:
    """A randomly initialized AutoencoderKL (about 0.66M parameters at the defaults).  Each block
    after the first halves the side: 32x32 images -> 4x16x16 latents.  ``scaling_factor`` starts
    at 1.0; set it from data with ``calibrate_latent_scale`` after training."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                         sample_size=image_size, scaling_factor=1.0)


def tiny_inpaint_unet(latent_size: int = 16, latent_channels: int = 4, num_classes: int = 10,
                      block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                      norm_num_groups: int = 16, attention_head_dim: int = 8, conditioning: str = "class",
                      cross_attention_dim: int = 32, seed: int = 0) -> UNet2DModel | UNet2DConditionModel:
    """A randomly initialized latent inpainting UNet: ``2 * latent_channels + 1`` input channels
    (noisy latents, mask, masked-image latents), ``latent_channels`` outputs (predicted noise).

    ``conditioning="class"`` (the study's model): ``UNet2DModel`` with ``num_class_embeds =
    num_classes + 1``; label ``num_classes`` is the null class used for classifier-free guidance
    (``null_label``).  ``conditioning="text"``: ``UNet2DConditionModel`` with cross-attention to a
    ``cross_attention_dim`` context, the same calling convention as Stable Diffusion's UNet (use
    it through ``FixedContextUNet``).  Attention sits at the lower resolution only."""
    torch.manual_seed(seed)
    common = dict(sample_size=latent_size, in_channels=2 * latent_channels + 1, out_channels=latent_channels,
                  block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                  norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim)
    n = len(block_out_channels)
    if conditioning == "class":
        return UNet2DModel(down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
                           up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
                           num_class_embeds=num_classes + 1, **common)
    if conditioning == "text":
        return UNet2DConditionModel(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                                    up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
                                    cross_attention_dim=cross_attention_dim, **common)
    raise ValueError(f"conditioning: {conditioning!r} is not 'class' or 'text'")


def tiny_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule (scaled_linear 0.00085..0.012, no sample
    clipping, ``steps_offset=1``, ``set_alpha_to_one=False``)."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


class FixedContextUNet(nn.Module):
    """Adapter that lets a text-conditioned ``UNet2DConditionModel`` (a real Stable Diffusion
    inpainting UNet) be called like the class-conditioned tiny UNet: ``unet(x, t, class_labels)``.

    Without a text encoder and tokenizer (not available offline) every call uses one fixed context
    ``[1, L, cross_attention_dim]``: zeros of length 77 by default -- an *unconditional* model, not
    the CLIP embedding of the empty prompt that PhotoGuard's attack uses -- or any saved embedding
    passed as ``context`` (e.g. CLIP's embedding of ``""`` computed elsewhere).  Labels are
    ignored, so conditional == unconditional and guidance reduces to one UNet call."""

    conditional = False

    def __init__(self, unet: UNet2DConditionModel, context: torch.Tensor | None = None, seq_len: int = 77):
        super().__init__()
        self.unet = unet
        if context is None:
            p = next(unet.parameters())
            context = torch.zeros(1, seq_len, unet.config.cross_attention_dim, dtype=p.dtype, device=p.device)
        self.register_buffer("context", context.detach(), persistent=False)

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample, timestep, class_labels=None):
        ctx = self.context.to(sample.dtype).expand(sample.shape[0], *self.context.shape[1:])
        return self.unet(sample, timestep, encoder_hidden_states=ctx)


def _inner(unet):
    return unet.unet if isinstance(unet, FixedContextUNet) else unet


def null_label(unet) -> int | None:
    """The null (unconditional) class of a class-conditioned UNet, or None for a UNet whose labels
    are ignored (``FixedContextUNet``, or a UNet without class embeddings)."""
    if isinstance(unet, FixedContextUNet):
        return None
    n = getattr(unet.config, "num_class_embeds", None)
    return None if n is None else int(n) - 1


def save_inpainting_dir(path, vae: AutoencoderKL, unet, scheduler: DDIMScheduler) -> Path:
    """Write the three models in the diffusers directory layout that ``from_pretrained(path,
    subfolder=...)`` reads: ``vae/``, ``unet/``, ``scheduler/`` (config.json + safetensors), plus a
    ``model_index.json`` naming the classes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inner = _inner(unet)
    vae.save_pretrained(path / "vae")
    inner.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    index = {"_class_name": "PhotoGuardInpainting", "_diffusers_version": _diffusers_version(),
             "vae": ["diffusers", type(vae).__name__], "unet": ["diffusers", type(inner).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _diffusers_version():
    import diffusers
    return diffusers.__version__


def load_inpainting_dir(path, torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        context: torch.Tensor | None = None, variant: str | None = None):
    """``(vae, unet, scheduler)`` from a diffusers-format directory on disk (``local_files_only``):
    a tiny model written by ``save_inpainting_dir`` or a real Stable Diffusion inpainting checkpoint
    (e.g. runwayml/stable-diffusion-inpainting; its ``text_encoder/`` and ``tokenizer/`` are not
    read).  The UNet class comes from ``unet/config.json``; a ``UNet2DConditionModel`` is wrapped in
    ``FixedContextUNet`` (``context``: see there).  The scheduler is always DDIM, built from
    ``scheduler/scheduler_config.json`` whatever scheduler the checkpoint names (eta = 1 needs DDIM),
    with ``clip_sample=False`` (Stable Diffusion's latents exceed [-1, 1]; diffusers' SD pipelines
    force the same).
    ``variant="fp16"`` selects ``*.fp16.safetensors`` weights.  Models are put in eval mode."""
    path = Path(path)
    kw = dict(local_files_only=True)
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    if variant is not None:
        kw["variant"] = variant
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).to(device).eval()
    cls_name = json.loads((path / "unet" / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
    if cls is None:
        raise ValueError(f"{path / 'unet'}: unsupported UNet class {cls_name!r}")
    unet = cls.from_pretrained(path, subfolder="unet", **kw).to(device).eval()
    if cls is UNet2DConditionModel:
        unet = FixedContextUNet(unet, None if context is None else context.to(device))
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True, clip_sample=False)
    return vae, unet, scheduler


# =============================================================================================
# Shared pieces
# =============================================================================================

def image_generators(generator: torch.Generator | Sequence[torch.Generator] | int | None,
                     n: int) -> list[torch.Generator]:
    """One CPU generator per image.  A sequence is used as given (one per image); an int seeds
    image i with ``seed * 1_000_003 + i``; a single generator (or None: the global one) draws one
    seed per image.  Everything random about image i comes from its own generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images")
        return list(generator)
    if isinstance(generator, int):
        return [torch.Generator().manual_seed(generator * 1_000_003 + i) for i in range(n)]
    seeds = torch.randint(0, 2**62, (n,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _randn(shape, g, like: torch.Tensor):
    """Normal noise from a CPU generator, drawn in float32 whatever the models' dtype."""
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def _labels(label, n: int, unet, device) -> torch.Tensor | None:
    """Per-image class labels (None: the null class, i.e. unconditional), or None when the UNet
    ignores labels."""
    null = null_label(unet)
    if null is None:
        return None
    if label is None:
        return torch.full((n,), null, dtype=torch.long, device=device)
    lab = torch.as_tensor(label, dtype=torch.long, device=device).reshape(-1)
    return lab.expand(n).clone() if lab.numel() == 1 else lab


def _guided(unet, labels) -> bool:
    """Whether classifier-free guidance needs a second (null-class) branch."""
    null = null_label(unet)
    return null is not None and labels is not None and bool((labels != null).any())


def latent_scale(vae) -> float:
    return float(vae.config.scaling_factor)


def _shift(vae) -> float:
    s = getattr(vae.config, "shift_factor", None)
    return 0.0 if s is None else float(s)


def to_model_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the UNet's latent space: ``(z - shift) * scaling_factor``."""
    return (z - _shift(vae)) * latent_scale(vae)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """UNet-space latents -> images in [-1, 1] (not clamped)."""
    return vae.decode(latents / latent_scale(vae) + _shift(vae)).sample


def encode_mean(vae, x: torch.Tensor) -> torch.Tensor:
    """``vae.encode(x).latent_dist.mean`` (the encoder attack's E), computed directly from the
    encoder and quant_conv without building the distribution."""
    h = vae.encoder(x)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    return h[:, : vae.config.latent_channels]


def encode_moments(vae, x: torch.Tensor):
    """Posterior mean and std of ``vae.encode(x)`` (std from the clamped log-variance)."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask >= 0.5`` as 0/1 in the mask's dtype: every function here binarizes its masks, as
    PhotoGuard's ``prepare_mask_and_masked_image`` does, so ``1 - mask`` and ``mask < 0.5`` agree."""
    return (mask >= 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32)


def masked_image(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PhotoGuard's / diffusers' masked image: ``x * (mask < 0.5)`` (the repainted region is 0)."""
    return x * (mask < 0.5).to(x.dtype)


def mask_to_latent(mask: torch.Tensor, size) -> torch.Tensor:
    """The mask at latent resolution (nearest-neighbour ``interpolate``, as the pipeline does)."""
    return F.interpolate(mask, size=tuple(size))


def composite(edited: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * edited + (1 - mask) * original``: the edit inside the mask, the original outside
    (PhotoGuard's ``recover_image`` applied to an edit, with the clean original)."""
    return mask * edited + (1 - mask) * original


def random_masks(n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                 min_frac: float = 0.25, max_frac: float = 0.75) -> torch.Tensor:
    """``[n, 1, H, W]`` float masks, each one axis-aligned rectangle of 1s whose sides are uniform
    in ``[min_frac, max_frac]`` of the image side, at a uniform position."""
    h, w = (size, size) if isinstance(size, int) else size
    out = torch.zeros(n, 1, h, w)
    for i in range(n):
        r = torch.rand(4, generator=generator)
        mh = max(1, int(round(h * (min_frac + (max_frac - min_frac) * float(r[0])))))
        mw = max(1, int(round(w * (min_frac + (max_frac - min_frac) * float(r[1])))))
        top = int(float(r[2]) * (h - mh + 1))
        left = int(float(r[3]) * (w - mw + 1))
        out[i, 0, top:top + mh, left:left + mw] = 1.0
    return out


# =============================================================================================
# Training
# =============================================================================================

def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0, kl_weight: float = 1e-6, progress: Callable[[int, float], None] | None = None
              ) -> list[float]:
    """Train the autoencoder in place on ``images`` ([N, C, H, W] in [-1, 1]): Adam on
    ``mse(decode(sample), x) + kl_weight * KL / (C H W)`` (the KL to N(0, I), per pixel, so the
    weight does not depend on the size).  Batches are drawn with replacement; batches and
    posterior samples come from one generator seeded by ``seed``, so the run is deterministic.
    Returns the reconstruction MSE of each step (before its update); ``progress(step, mse)``."""
    g = torch.Generator().manual_seed(seed)
    p = next(vae.parameters())
    opt = _adam(vae.parameters(), lr)
    vae.train()
    history = []
    d = images[0].numel()
    for step in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        x = images[idx].to(device=p.device, dtype=p.dtype)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * _randn(dist.mean.shape, g, dist.mean)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + kl_weight * dist.kl().mean() / d
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(mse.detach()))
        if progress is not None:
            progress(step, history[-1])
    vae.eval()
    return history


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error of ``decode(mean(encode(x)))`` against ``x`` (deterministic)."""
    p = next(vae.parameters())
    tot, cnt = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device=p.device, dtype=p.dtype)
        rec = vae.decode(encode_mean(vae, x)).sample
        tot += float(((rec - x) ** 2).sum())
        cnt += x.numel()
    return tot / cnt


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of the posterior means of ``images`` (how
    Stable Diffusion's 0.18215 was chosen), so the UNet sees unit-variance latents.  Saved with
    the VAE's config by ``save_inpainting_dir``.  Returns the factor."""
    p = next(vae.parameters())
    zs = [encode_mean(vae, images[i:i + batch_size].to(device=p.device, dtype=p.dtype))
          for i in range(0, len(images), batch_size)]
    factor = float(1.0 / torch.cat(zs).float().std().clamp_min(1e-8))
    vae.register_to_config(scaling_factor=factor)
    return factor


def train_inpaint_unet(unet, vae: AutoencoderKL, scheduler: DDIMScheduler, images: torch.Tensor,
                       labels: torch.Tensor | None, steps: int, batch_size: int = 64, lr: float = 2e-4,
                       seed: int = 0, label_dropout: float = 0.1, full_mask_prob: float = 0.25,
                       progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the inpainting UNet in place (the VAE is frozen; set its latent scale first with
    ``calibrate_latent_scale``).  Each step: a batch (with replacement), latents = scale * a
    posterior sample, random rectangular masks (``random_masks``; a fraction ``full_mask_prob``
    masks the whole image), masked-image latents of ``x * (mask < 0.5)``, the mask at latent
    resolution, a uniform timestep, and the MSE between the predicted and the added noise.  Labels
    are replaced by the null class with probability ``label_dropout`` (for classifier-free
    guidance); ``labels=None`` trains unconditionally.  Deterministic given ``seed``.  Returns the
    loss of each step; ``progress(step, loss)``."""
    g = torch.Generator().manual_seed(seed)
    p = next(unet.parameters())
    vae.eval()
    opt = _adam(unet.parameters(), lr)
    unet.train()
    null = null_label(unet)
    T = scheduler.config.num_train_timesteps
    side = images.shape[-2:]
    history = []
    for step in range(steps):
        b = min(batch_size, len(images))
        idx = torch.randint(0, len(images), (b,), generator=g)
        x = images[idx].to(device=p.device, dtype=p.dtype)
        masks = random_masks(b, tuple(side), g)
        full = torch.rand(b, generator=g) < full_mask_prob
        masks[full] = 1.0
        masks = masks.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            mean, std = encode_moments(vae, torch.cat([x, masked_image(x, masks)]))
            z = to_model_latents(vae, mean + std * _randn(mean.shape, g, mean))
            z0, zm = z[:b], z[b:]
        noise = _randn(z0.shape, g, z0)
        t = torch.randint(0, T, (b,), generator=g).to(p.device)
        noisy = scheduler.add_noise(z0, noise, t)
        inp = torch.cat([noisy, mask_to_latent(masks, z0.shape[-2:]), zm], 1)
        lab = None
        if null is not None:
            lab = torch.full((b,), null, dtype=torch.long) if labels is None else labels[idx].long().clone()
            lab[torch.rand(b, generator=g) < label_dropout] = null
            lab = lab.to(p.device)
        pred = unet(inp, t, class_labels=lab).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step, history[-1])
    unet.eval()
    return history


# =============================================================================================
# The inpainting loop (batched; shared by ``inpaint`` and the fast diffusion attack)
# =============================================================================================

def _draw_edit_noise(gens, num_steps: int, latent_shape, like, reps: int = 1):
    """For each EOT draw r and image i: ``[2 + num_steps, c, h, w]`` normal noise from image i's
    generator -- initial latents, the masked-image posterior sample, one DDIM variance noise per
    step.  Drawn rep by rep for each image.  Returns ``[reps, n, 2 + num_steps, c, h, w]``."""
    shape = (2 + num_steps, *latent_shape)
    per_image = [torch.stack([_randn(shape, g, like) for _ in range(reps)]) for g in gens]
    return torch.stack(per_image, 1)


def _timesteps(scheduler, num_steps: int):
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def _denoise(unet, scheduler, latents, mask_lat, masked_lat, labels, guided: bool, guidance: float,
             eta: float, timesteps, var_noise):
    """The DDIM loop over a batch: the UNet sees ``cat(latents, mask, masked-image latents)``;
    with ``guided`` both branches run in one call (conditional first, null second)."""
    null = null_label(unet)
    for k, t in enumerate(timesteps):
        inp = torch.cat([latents, mask_lat, masked_lat], 1)
        if guided:
            both = unet(torch.cat([inp, inp]), t,
                        class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(inp, t, class_labels=labels).sample
        latents = scheduler.step(eps, t, latents, eta=eta,
                                 variance_noise=var_noise[:, k] if eta > 0 else None).prev_sample
    return latents


def _edit_batch(vae, unet, scheduler, masked: torch.Tensor, mask: torch.Tensor, labels, guidance, eta,
                noise: torch.Tensor, timesteps, init_latents: torch.Tensor | None = None):
    """Differentiable inpainting of ``n`` masked images under ``R`` noise draws at once
    (``noise``: ``[R, n, 2 + S, c, h, w]``).  The encoder runs once per image; the R draws of the
    posterior sample share its mean and std.  Returns ``[R, n, C, H, W]``."""
    R, n = noise.shape[:2]
    mean, std = encode_moments(vae, masked)
    masked_lat = to_model_latents(vae, mean[None] + std[None] * noise[:, :, 1]).flatten(0, 1)
    mask_lat = mask_to_latent(mask, mean.shape[-2:]).to(mean.dtype).repeat(R, 1, 1, 1)
    if init_latents is None:
        latents = noise[:, :, 0].flatten(0, 1) * scheduler.init_noise_sigma
    else:
        latents = init_latents
    lab = None if labels is None else labels.repeat(R)
    guided = _guided(unet, labels)
    out = _denoise(unet, scheduler, latents, mask_lat, masked_lat, lab, guided, guidance, eta, timesteps,
                   noise[:, :, 2:].flatten(0, 1))
    img = decode(vae, out)
    return img.reshape(R, n, *img.shape[1:])


@torch.no_grad()
def inpaint(vae, unet, scheduler, image: torch.Tensor, mask: torch.Tensor, label=None,
            num_steps: int = DEFAULTS["edit"]["num_steps"], guidance: float = DEFAULTS["edit"]["guidance"],
            eta: float = DEFAULTS["edit"]["eta"], generator=None, strength: float = 1.0) -> torch.Tensor:
    """Inpaint ``image`` ([n, C, H, W] in [-1, 1]) where ``mask`` ([n, 1, H, W]) is 1, with DDIM.

    ``label``: an int, one per image, or None (the null class: unconditional); ignored by a
    ``FixedContextUNet``.  Guidance: ``eps_null + guidance * (eps_label - eps_null)``.
    ``strength`` < 1 starts from the image's latents noised to the ``strength`` fraction of the
    schedule (diffusers' img2img convention; PhotoGuard's notebooks pass 0.7); 1 starts from pure
    noise.  Deterministic given ``generator`` (see ``image_generators``; noise per image: initial
    latents, masked-image posterior sample, one DDIM noise per step, then the image's own posterior
    sample).  Returns the decoded images, clamped to [-1, 1], **not** composited (see
    ``composite``)."""
    p = next(vae.parameters())
    image = image.to(device=p.device, dtype=p.dtype)
    mask = binary_mask(mask).to(device=p.device, dtype=p.dtype)
    n = len(image)
    gens = image_generators(generator, n)
    timesteps = _timesteps(scheduler, num_steps)
    latent_shape = encode_mean(vae, image[:1]).shape[1:]
    noise = _draw_edit_noise(gens, num_steps, latent_shape, image)
    init = None
    if strength < 1.0:
        keep = min(int(num_steps * strength), num_steps)
        timesteps = timesteps[num_steps - keep:]
        extra = torch.stack([_randn(latent_shape, g, image) for g in gens])
        mean, std = encode_moments(vae, image)
        z = to_model_latents(vae, mean + std * extra)
        if len(timesteps) == 0:
            return decode(vae, z).clamp(-1, 1)
        init = scheduler.add_noise(z, noise[0, :, 0], timesteps[:1].repeat(n))
        noise = torch.cat([noise[:, :, :2], noise[:, :, 2 + num_steps - keep:]], 2)
    labels = _labels(label, n, unet, p.device)
    out = _edit_batch(vae, unet, scheduler, masked_image(image, mask), mask, labels, guidance, eta, noise,
                      timesteps, init)
    return out[0].clamp(-1, 1)


# =============================================================================================
# Encoder attack
# =============================================================================================

@dataclass
class AttackResult:
    """``image``: immunized images ``[n, C, H, W]`` in [-1, 1], equal to the input inside the
    mask.  ``losses``: ``[iters, n]``, each image's objective at each iterate before its step (the
    diffusion attack: the mean over the EOT draws), as the original's progress bar shows it."""
    image: torch.Tensor
    losses: torch.Tensor


def _step_size(step: float, i: int, iters: int) -> float:
    """Linear decay from ``step`` towards ``step / 100``: ``a - (a - a/100) * i / T``."""
    return step - (step - step / 100) * i / iters


def _keep(mask, x):
    return torch.ones_like(x[:, :1]) if mask is None else (1 - binary_mask(mask).to(device=x.device, dtype=x.dtype))


def _uniform_start(gens, shape, eps, like):
    return torch.stack([((torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * eps)
                        .to(device=like.device, dtype=like.dtype) for g in gens])


def _target_latents(target_latent, x):
    if target_latent is None:
        return None
    return target_latent.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def encoder_objective(vae, x: torch.Tensor, target_latent: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, encode_masked: bool = True) -> torch.Tensor:
    """The encoder attack's objective per image, ``||E(x') - z_t||_2`` with ``x' = x * (1 - mask)``
    when ``mask`` is given and ``encode_masked`` (else ``x``); ``z_t = 0`` when None."""
    keep = _keep(mask, x)
    z = encode_mean(vae, x * keep if (mask is not None and encode_masked) else x)
    t = _target_latents(target_latent, x)
    return (z if t is None else z - t).flatten(1).norm(dim=1)


def encoder_attack(vae, x: torch.Tensor, target_latent: torch.Tensor | None = None,
                   eps: float = DEFAULTS["encoder"]["eps"], step: float = DEFAULTS["encoder"]["step"],
                   iters: int = DEFAULTS["encoder"]["iters"], mask: torch.Tensor | None = None,
                   generator=None, encode_masked: bool = True) -> AttackResult:
    """PhotoGuard's encoder attack (``pgd`` in the notebooks and app.py), batched over images.

    Minimizes ``||E(x + d) - z_t||_2`` over ``||d||_inf <= eps`` for each image, E the posterior
    mean.  ``target_latent``: ``[n or 1, c, h, w]`` (e.g. ``encode_mean(vae, gray)``) or None for
    0 (the img2img notebook).  Start ``x + U[-eps, eps]``, then ``T = iters`` steps
    ``x <- x - a_i sign(grad)``, ``a_i = a - (a - a/100) i/T``, projected onto the eps-box around x,
    clamped to [-1, 1].  With ``mask`` the perturbation is multiplied by ``1 - mask`` after each
    step (and at the start), and with ``encode_masked`` the encoder sees ``(x + d) * (1 - mask)``
    -- the masked image an inpainting editor encodes; the original attacks that masked image
    directly, then pastes the original pixels back inside the mask (``recover_image``), which is
    the same thing.  Unlike the original the start is clamped to [-1, 1] too."""
    x = x.detach()
    n = len(x)
    gens = image_generators(generator, n)
    keep = _keep(mask, x)
    enc_keep = keep if (mask is not None and encode_masked) else None
    target = _target_latents(target_latent, x)
    delta = _uniform_start(gens, x.shape[1:], eps, x) * keep
    xa = (x + delta).clamp(-1, 1)
    losses = []
    for i in range(iters):
        a = _step_size(step, i, iters)
        xa.requires_grad_(True)
        z = encode_mean(vae, xa if enc_keep is None else xa * enc_keep)
        loss = (z if target is None else z - target).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        with torch.no_grad():
            xa = xa - a * grad.sign()
            xa = torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(-1, 1)
            xa = x + (xa - x) * keep
        losses.append(loss.detach())
    return AttackResult(xa.detach(), torch.stack(losses) if losses else torch.zeros(0, n))


def encoder_attack_reference(vae, x: torch.Tensor, target_latent: torch.Tensor | None = None,
                             eps: float = DEFAULTS["encoder"]["eps"], step: float = DEFAULTS["encoder"]["step"],
                             iters: int = DEFAULTS["encoder"]["iters"], mask: torch.Tensor | None = None,
                             generator=None, encode_masked: bool = True) -> AttackResult:
    """The encoder attack written out one image at a time with ``vae.encode(.).latent_dist.mean``
    (same arguments, same random numbers as ``encoder_attack``)."""
    gens = image_generators(generator, len(x))
    out, hist = [], []
    for i in range(len(x)):
        x0 = x[i:i + 1].detach()
        keep = torch.ones_like(x0[:, :1]) if mask is None else 1 - binary_mask(mask[i:i + 1]).to(x0.dtype)
        zt = None if target_latent is None else target_latent[i if len(target_latent) > 1 else 0][None].to(x0.dtype)
        start = (torch.rand(x0.shape[1:], generator=gens[i], dtype=torch.float32) * 2 - 1) * eps
        x_adv = torch.clamp(x0 + start.to(x0.dtype)[None] * keep, -1, 1)
        losses = []
        for k in range(iters):
            a = step - (step - step / 100) * k / iters
            x_adv = x_adv.detach().requires_grad_(True)
            seen = x_adv * keep if (mask is not None and encode_masked) else x_adv
            z = vae.encode(seen).latent_dist.mean
            loss = (z - zt).norm() if zt is not None else z.norm()
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() - a * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps)
            x_adv = torch.clamp(x_adv, -1, 1)
            x_adv = x0 + (x_adv - x0) * keep
            losses.append(float(loss.detach()))
        out.append(x_adv.detach()[0])
        hist.append(torch.tensor(losses, dtype=x.dtype))
    return AttackResult(torch.stack(out), torch.stack(hist, 1) if iters else torch.zeros(0, len(x)))


# =============================================================================================
# Diffusion attack
# =============================================================================================

def _target_image(target, x):
    return torch.as_tensor(target, dtype=x.dtype, device=x.device)


def diffusion_objective(vae, unet, scheduler, x: torch.Tensor, mask: torch.Tensor, label=None, reps: int = 4,
                        num_steps: int = 4, guidance: float = 7.5, eta: float = 1.0, generator=None,
                        target=0.0) -> torch.Tensor:
    """The diffusion attack's objective per image, ``mean_r ||f_r(x) - target||_2`` over ``reps``
    noise draws of the few-step inpainting loop ``f`` (no gradient).  Use the same ``generator``
    seed for two images to compare them under common random numbers."""
    with torch.no_grad():
        n = len(x)
        gens = image_generators(generator, n)
        p = next(vae.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        mask = binary_mask(mask).to(device=p.device, dtype=p.dtype)
        timesteps = _timesteps(scheduler, num_steps)
        latent_shape = encode_mean(vae, x[:1]).shape[1:]
        noise = _draw_edit_noise(gens, num_steps, latent_shape, x, reps)
        out = _edit_batch(vae, unet, scheduler, x * (1 - mask), mask, _labels(label, n, unet, p.device),
                          guidance, eta, noise, timesteps)
        return (out - _target_image(target, x)).flatten(2).norm(dim=2).mean(0)


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {NORMS}")


def diffusion_attack(vae, unet, scheduler, x: torch.Tensor, mask: torch.Tensor, label=None,
                     eps: float = DEFAULTS["diffusion_l2"]["eps"], step: float = DEFAULTS["diffusion_l2"]["step"],
                     iters: int = DEFAULTS["diffusion_l2"]["iters"], norm: str = "l2",
                     grad_reps: int = DEFAULTS["diffusion_l2"]["grad_reps"],
                     num_steps: int = DEFAULTS["diffusion_l2"]["num_steps"],
                     guidance: float = DEFAULTS["diffusion_l2"]["guidance"],
                     eta: float = DEFAULTS["diffusion_l2"]["eta"], generator=None, target=0.0,
                     rep_chunk: int | None = None) -> AttackResult:
    """PhotoGuard's diffusion attack (``super_l2`` / ``super_linf``), batched over images and EOT
    draws.

    ``f(x)`` = the inpainting loop of ``inpaint`` with ``num_steps`` DDIM steps on the masked
    image ``x * (1 - mask)`` (pure-noise start, posterior-sampled masked-image latents, eta,
    guidance towards ``label``; ``label=None`` = the null class, like the original's empty prompt,
    for which guidance is a no-op).  Each iteration: ``grad_reps`` fresh noise draws per image,
    ``loss_r = ||f_r(x_adv) - target||_2`` (``target`` 0: a gray image), gradient of each loss times
    ``1 - mask``, averaged over the draws.  ``norm="l2"``: ``x_adv -= step * g / ||g||``, then
    ``x + renorm(x_adv - x, eps)``, clamp to [-1, 1]; ``norm="linf"``: ``x_adv -= step * sign(g)``,
    projection onto the eps-box, clamp.  Constant step (no decay), no random start, as in the
    notebook.  ``rep_chunk`` caps how many draws share one forward/backward pass (memory on large
    models; default all of them)."""
    _check_norm(norm)
    p = next(vae.parameters())
    x = x.detach().to(device=p.device, dtype=p.dtype)
    mask = binary_mask(mask).to(device=p.device, dtype=p.dtype)
    n = len(x)
    gens = image_generators(generator, n)
    keep = 1 - mask
    labels = _labels(label, n, unet, p.device)
    tgt = _target_image(target, x)
    timesteps = _timesteps(scheduler, num_steps)
    with torch.no_grad():
        latent_shape = encode_mean(vae, x[:1]).shape[1:]
    chunk = grad_reps if rep_chunk is None else max(1, int(rep_chunk))
    xa = x.clone()
    losses = []
    for _ in range(iters):
        noise = _draw_edit_noise(gens, num_steps, latent_shape, x, grad_reps)
        grad = torch.zeros_like(x)
        loss_sum = torch.zeros(n, dtype=x.dtype, device=x.device)
        for r0 in range(0, grad_reps, chunk):
            xr = xa.detach().requires_grad_(True)
            out = _edit_batch(vae, unet, scheduler, xr * keep, mask, labels, guidance, eta,
                              noise[r0:r0 + chunk], timesteps)
            loss = (out - tgt).flatten(2).norm(dim=2)          # [r, n]
            (g,) = torch.autograd.grad(loss.sum(), xr)
            grad += g
            loss_sum += loss.detach().sum(0)
        with torch.no_grad():
            grad = grad * keep / grad_reps
            if norm == "l2":
                gn = grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
                xa = xa - step * grad / (gn + 1e-10)
                d = xa - x
                dn = d.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
                d = d * torch.clamp(eps / (dn + 1e-12), max=1.0)
                xa = (x + d).clamp(-1, 1)
            else:
                xa = xa - step * grad.sign()
                xa = torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(-1, 1)
        losses.append(loss_sum / grad_reps)
    return AttackResult(xa.detach(), torch.stack(losses) if losses else torch.zeros(0, n))


def _edit_one_reference(vae, unet, scheduler, masked1, mask1, label, guidance, eta, noise1, num_steps):
    """One image, one noise draw, written out: encode, sample, DDIM with one UNet call per
    guidance branch, decode."""
    dist = vae.encode(masked1[None]).latent_dist
    z = dist.mean + dist.std * noise1[1][None]
    masked_lat = (z - _shift(vae)) * vae.config.scaling_factor
    mask_lat = F.interpolate(mask1[None], size=masked_lat.shape[-2:])
    latents = noise1[0][None] * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps)
    null = null_label(unet)
    for k, t in enumerate(scheduler.timesteps):
        inp = torch.cat([latents, mask_lat, masked_lat], dim=1)
        if null is None:
            eps = unet(inp, t).sample
        elif label is None or int(label) == null:
            eps = unet(inp, t, class_labels=torch.tensor([null], device=inp.device)).sample
        else:
            eps_c = unet(inp, t, class_labels=torch.tensor([int(label)], device=inp.device)).sample
            eps_u = unet(inp, t, class_labels=torch.tensor([null], device=inp.device)).sample
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, variance_noise=noise1[2 + k][None] if eta > 0 else None
                                 ).prev_sample
    return vae.decode(latents / vae.config.scaling_factor + _shift(vae)).sample[0]


def diffusion_attack_reference(vae, unet, scheduler, x: torch.Tensor, mask: torch.Tensor, label=None,
                               eps: float = DEFAULTS["diffusion_l2"]["eps"],
                               step: float = DEFAULTS["diffusion_l2"]["step"],
                               iters: int = DEFAULTS["diffusion_l2"]["iters"], norm: str = "l2",
                               grad_reps: int = DEFAULTS["diffusion_l2"]["grad_reps"],
                               num_steps: int = DEFAULTS["diffusion_l2"]["num_steps"],
                               guidance: float = DEFAULTS["diffusion_l2"]["guidance"],
                               eta: float = DEFAULTS["diffusion_l2"]["eta"], generator=None,
                               target=0.0) -> AttackResult:
    """The diffusion attack written out like the notebook's ``compute_grad`` / ``super_l2`` /
    ``super_linf``: one image at a time, one forward and backward pass per EOT draw (same
    arguments and random numbers as ``diffusion_attack``)."""
    _check_norm(norm)
    n = len(x)
    gens = image_generators(generator, n)
    labels = [None] * n if label is None else torch.as_tensor(label).reshape(-1).expand(n).tolist()
    out, hist = [], []
    for i in range(n):
        x0 = x[i].detach()
        m = binary_mask(mask[i]).to(x0.dtype)
        tgt = torch.as_tensor(target, dtype=x0.dtype)
        tgt = tgt[i] if tgt.ndim == 4 else tgt
        latent_shape = vae.encode(x0[None]).latent_dist.mean.shape[1:]
        x_adv = x0.clone()
        losses = []
        for _ in range(iters):
            noises = [torch.randn((2 + num_steps, *latent_shape), generator=gens[i], dtype=torch.float32)
                      .to(x0.dtype) for _ in range(grad_reps)]
            grads, rep_losses = [], []
            for r in range(grad_reps):
                cur = x_adv.clone().requires_grad_(True)
                img = _edit_one_reference(vae, unet, scheduler, cur * (1 - m), m, labels[i], guidance, eta,
                                          noises[r], num_steps)
                loss = (img - tgt).norm(p=2)
                (g,) = torch.autograd.grad(loss, [cur])
                grads.append(g * (1 - m))
                rep_losses.append(float(loss.detach()))
            grad = torch.stack(grads).mean(0)
            if norm == "l2":
                x_adv = x_adv - step * grad / (grad.norm() + 1e-10)
                d = x_adv - x0
                if d.norm() > eps:
                    d = d * (eps / d.norm())
                x_adv = torch.clamp(x0 + d, -1, 1)
            else:
                x_adv = x_adv - step * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps)
                x_adv = torch.clamp(x_adv, -1, 1)
            losses.append(sum(rep_losses) / grad_reps)
        out.append(x_adv.detach())
        hist.append(torch.tensor(losses, dtype=x.dtype))
    return AttackResult(torch.stack(out), torch.stack(hist, 1) if iters else torch.zeros(0, n))


def noise_immunize(x: torch.Tensor, eps: float = DEFAULTS["noise_eps"], mask: torch.Tensor | None = None,
                   generator=None) -> torch.Tensor:
    """The paper's random-noise baseline: ``x + U[-eps, eps]`` outside the mask, clamped."""
    gens = image_generators(generator, len(x))
    return (x + _uniform_start(gens, x.shape[1:], eps, x) * _keep(mask, x)).clamp(-1, 1)


# =============================================================================================
# Metrics
# =============================================================================================

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(range^2 / mse)`` (inf for equal images);
    ``data_range`` 2 for [-1, 1] pixels."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(win_size: int, sigma: float, dtype, device):
    r = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g.to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian-weighted local means,
    variances and covariance (population, not sample), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, averaged
    over the valid window positions and the channels (skimage ``structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L``)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim wants two [n, C, H, W] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of side {tuple(x.shape[-2:])} are smaller than the window ({win_size})")
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)
    kh = g.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = g.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the Fréchet distance between two
    Gaussians (the FID formula, computed as pytorch-fid does: scipy ``sqrtm``, an ``eps * I``
    offset when the product is singular, the real part)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (sample, ddof 1) covariance of ``[N, D]`` feature vectors."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fid(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of ``[N, D]`` feature vectors (the
    study uses a locally trained classifier's features in place of Inception's)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
