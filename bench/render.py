"""Renders per second of the 3DB study's headless renderer (kernels/render.py: pyrender on Mesa's
llvmpipe through EGL, in its render server process) at 64x64 and 128x128, for solid-colour objects
and patterned textures (finer meshes), with and without a corruption.

    python bench/render.py            # a minute or two
    python bench/render.py --quick

No peer runs side by side: 3DB renders with Blender (Cycles), which is not installable here (its
asset kit is not offline, and its renderer targets Blender 2.9x); the ratios are between sizes and
scene kinds of the same renderer.  Median of ``--repeats`` timed batches after a warm-up batch.
Writes bench/results/render.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scenes(kind: str, n: int, seed: int = 0):
    import numpy as np

    from kernels.render import OBJECT_CLASSES, SceneParams

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(SceneParams(object=OBJECT_CLASSES[i % len(OBJECT_CLASSES)],
                               texture="checker" if kind == "textured" else "own",
                               rotation=tuple(rng.uniform(-3.1, 3.1, 3)), zoom=float(rng.uniform(0.7, 1.5)),
                               corruption="gaussian_blur" if kind == "corrupted" else None, severity=3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from bench.results_file import write_results
    from kernels.render import Renderer

    batch = 32 if args.quick else 128
    repeats = 2 if args.quick else args.repeats
    results, table = [], []
    for size in (64, 128):
        t0 = time.perf_counter()
        with Renderer(size) as r:
            start = time.perf_counter() - t0
            for kind in ("solid", "textured", "corrupted"):
                sc = scenes(kind, batch)
                r.render_many(sc)                       # warm-up: meshes uploaded
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    r.render_many(sc)
                    times.append(time.perf_counter() - t)
                rate = batch / statistics.median(times)
                table.append((size, kind, rate))
                results.append({"case": f"{size}px/{kind}", "system": "provenance", "metric": "renders_per_second",
                                "value": round(rate, 1), "runs": repeats})
        results.append({"case": f"{size}px", "system": "provenance", "metric": "server_start_seconds",
                        "value": round(start, 2), "runs": 1})
    print(f"{'size':>5} {'scenes':<10} {'renders/s':>10}")
    for size, kind, rate in table:
        print(f"{size:>5} {kind:<10} {rate:>10.1f}")
    rates = {(s, k): v for s, k, v in table}
    ratios = [{"case": kind, "metric": "renders_per_second", "of": "128px", "over": "64px",
               "value": round(rates[(128, kind)] / rates[(64, kind)], 3)} for kind in ("solid", "textured", "corrupted")]
    write_results("render", {"batch": batch, "repeats": repeats}, results, ratios, quick=args.quick)


if __name__ == "__main__":
    main()
