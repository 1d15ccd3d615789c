"""What sets the encoder attack's strength at a fixed per-pixel budget: the image side, or the
VAE's downsampling?

    python bench/photoguard_scale.py            # Fashion-MNIST 10k; about 15 minutes on 2 cores
    python bench/photoguard_scale.py --quick    # digits at 16 px, small budgets (plumbing only)

PhotoGuard's encoder attack works at 512 px with an l_inf budget of 0.06 (pixels in [-1, 1]): the
perturbed image's latent lands close to the target's.  bench/photoguard.py finds that at 32 px the
same budget moves the latent of the study's small VAE only a few percent of the way.  Two
hypotheses: (a) an l_inf ball's reach through a locally linear map grows with the number of pixels
it can use (``eps * ||grad||_1``), so the same budget is weaker on smaller images; (b) a
convolutional encoder's latent cells each see a local patch, so what counts is the pixels per
latent cell -- the downsampling factor f, 2 in the study's small VAE, 8 in Stable Diffusion's.
Configurations: the study's VAE (f = 2) at 16 and 32 px (a), and f = 2, 4, 8 at 32 px (b; f = 8
with 4 latent channels has Stable Diffusion's compression, 48 values per latent value).  Each is
an AutoencoderKL trained with the same steps on the same images resized; the attack of the study
(200 PGD steps, gray target, the centre half repainted, so the perturbation lives on the other 3/4)
runs at l_inf 0.06 and 0.24 on the same test images.  Prints, per side and budget, ``reach`` (the share of the way
from the clean latent to the target latent the attack moved, ``1 - ||E(x') - z_t|| / ||E(x) - z_t||``),
the same for uniform noise at that budget, and the VAE's reconstruction PSNR; writes
bench/results/photoguard_scale.json.  No peer: this measures one mechanism behind the study's result.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.tables import markdown  # noqa: E402

# (side, VAE block widths): each block after the first halves the side
FULL = {"source": "fashion_mnist", "train": 10000, "test": 16, "steps": 500, "eps": [0.06, 0.24], "iters": 200,
        "models": [[16, [32, 64]], [32, [32, 64]], [32, [32, 64, 64]], [32, [32, 64, 64, 64]]]}
QUICK = {"source": "digits", "train": 600, "test": 6, "steps": 60, "eps": [0.06], "iters": 40,
         "models": [[16, [16, 32]], [16, [16, 32, 32]]]}


def load(source: str, n_train: int, n_test: int):
    from ops.sources import load_source
    from ops.spec import DatasetSpec

    raw = load_source(DatasetSpec(source=source, limit_train=n_train, limit_test=n_test), seed=0)
    return raw.images[~raw.is_test], raw.images[raw.is_test]


def measure(side: int, channels: list[int], train, test, cfg: dict) -> list[dict]:
    import torch

    from kernels import photoguard as pg
    from ops.photoguard import to_model_images

    xt, x = to_model_images(train, side), to_model_images(test, side)
    vae = pg.tiny_vae(side, 3, block_out_channels=tuple(channels), norm_num_groups=min(channels) // 2, seed=0)
    f = 2 ** (len(channels) - 1)
    t0 = time.perf_counter()
    pg.train_vae(vae, xt, cfg["steps"], batch_size=32, lr=1e-3, seed=0)
    train_s = time.perf_counter() - t0
    pg.calibrate_latent_scale(vae, xt[:2000])
    for p in vae.parameters():
        p.requires_grad_(False)
    rec = 10 * torch.log10(torch.tensor(4.0 / pg.reconstruction_mse(vae, x))).item()
    k = side // 4
    mask = torch.zeros(len(x), 1, side, side)
    mask[..., k:side - k, k:side - k] = 1.0
    target = pg.encode_mean(vae, torch.zeros_like(x[:1]))
    base = pg.encoder_objective(vae, x, target, mask)
    rows = []
    for eps in cfg["eps"]:
        t0 = time.perf_counter()
        adv = pg.encoder_attack(vae, x, target, eps=eps, step=eps / 6, iters=cfg["iters"], mask=mask,
                                generator=pg.image_generators(2, len(x))).image
        sec = (time.perf_counter() - t0) / len(x)
        noisy = pg.noise_immunize(x, eps=eps, mask=mask, generator=pg.image_generators(1, len(x)))
        reach = lambda v: float((1 - pg.encoder_objective(vae, v, target, mask) / base).mean())   # noqa: E731
        rows.append({"side": side, "downsample": f, "eps": eps, "reach_encoder": reach(adv), "reach_noise": reach(noisy),
                     "l2_encoder": float((adv - x).flatten(1).norm(dim=1).mean()),
                     "latent_dims": int(target.numel()), "reconstruction_psnr": rec, "vae_train_s": train_s,
                     "attack_s_per_image": sec})
        print(f"  {side} px, f {f}, eps {eps:g}: encoder reach {rows[-1]['reach_encoder']:.3f}, "
              f"noise {rows[-1]['reach_noise']:.3f} (VAE {rec:.1f} dB, trained in {train_s:.0f} s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import polars as pl
    import torch

    from bench.results_file import write_results

    cfg = QUICK if args.quick else FULL
    train, test = load(cfg["source"], cfg["train"], cfg["test"])
    rows = []
    for side, channels in cfg["models"]:
        rows += measure(side, channels, train, test, cfg)
    table = pl.DataFrame(rows)
    print(f"\n== the encoder attack's reach towards its target latent, by image side and VAE downsampling ({cfg['source']}, "
          f"{cfg['test']} images, {cfg['iters']} PGD steps, torch threads {torch.get_num_threads()})")
    print(markdown(table, digits=3))
    results, ratios = [], []
    for r in rows:
        case = f"{cfg['source']}-{r['side']}px-f{r['downsample']}-eps{r['eps']:g}"
        for m in ("reach_encoder", "reach_noise", "l2_encoder", "reconstruction_psnr", "attack_s_per_image"):
            results.append({"case": case, "system": "provenance", "metric": m, "value": round(r[m], 6), "runs": 1})
    side0, f0 = cfg["models"][0][0], 2 ** (len(cfg["models"][0][1]) - 1)
    first = {r["eps"]: r for r in rows if (r["side"], r["downsample"]) == (side0, f0)}
    for r in rows:
        if (r["side"], r["downsample"]) != (side0, f0) and first[r["eps"]]["reach_encoder"] > 0:
            ratios.append({"case": f"{cfg['source']}-eps{r['eps']:g}", "metric": "reach_encoder",
                           "of": f"{r['side']}px-f{r['downsample']}", "over": f"{side0}px-f{f0}",
                           "value": round(r["reach_encoder"] / first[r["eps"]]["reach_encoder"], 3)})
    write_results("photoguard_scale", {**cfg, "torch_threads": torch.get_num_threads()}, results, ratios,
                  quick=args.quick)


if __name__ == "__main__":
    main()
