"""New data without retraining: scoring new query examples against a finished experiment, side by
side with re-running the whole lineage.

On the demo experiment (digits, experiments/demo.yaml), in a fresh home:

- ``full``: ``./provenance run demo`` from nothing (what a user without ``score`` would do to get
  attributions for new examples: add them to the data and run everything again);
- ``score``: ``./provenance score demo <folder>`` of 100 new query images (PNG files of digits the
  demo never saw -- the digits the demo's ``limit_*`` leave out are not available, so the queries
  are the demo's test images shifted by one pixel, which makes them new inputs to every model),
  in a fresh process each time (Python start-up and imports included), and in-process
  (``ops.newdata.score_queries`` alone).

Both systems run in subprocesses on the same machine, alternating (full, score, score, ...), and
the ratio is full / score (medians).  Target (issue 14): at least 20x.

    python bench/new_data.py            # 1 full run, 3 score runs, 100 queries
    python bench/new_data.py --quick    # 20 queries, 1 score run
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from PIL import Image

    from bench.results_file import write_results

    n_q, repeats = (20, 1) if args.quick else (args.queries, args.repeats)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PROVENANCE_HOME": str(tmp / "home")}
        t0 = time.perf_counter()
        full = subprocess.run([sys.executable, "cli.py", "run", "demo", "--log-level", "WARNING"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        full_s = time.perf_counter() - t0
        if full.returncode != 0:
            raise SystemExit(f"the demo run failed:\n{full.stderr[-3000:]}")
        art = tmp / "home" / "artifacts" / "demo" / "training_set"
        images = np.load(art / "test_images.npy")
        folder = tmp / "queries"
        folder.mkdir()
        for i in range(n_q):
            img = np.roll(images[i % len(images)], 1, axis=1)           # shifted: a new input
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"query{i:03d}.png")
        score_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "cli.py", "score", "demo", str(folder)], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
            score_s.append(time.perf_counter() - t0)
            if out.returncode != 0:
                raise SystemExit(f"score failed:\n{out.stderr[-3000:]}")
        code = ("import sys, time; sys.path.insert(0, {root!r}); import torch\n"
                "from ops.spec import load_spec_file; from ops.store import ArtifactStore\n"
                "from ops.newdata import read_queries, score_queries\n"
                "spec = load_spec_file({spec!r}); store = ArtifactStore({art!r})\n"
                "q = read_queries(spec, store, 'demo', {folder!r}); t = time.perf_counter()\n"
                "score_queries(spec, store, 'demo', q, 'cpu'); print(time.perf_counter() - t)\n")
        inproc = subprocess.run([sys.executable, "-c", code.format(
            root=str(ROOT), spec=str(ROOT / "experiments" / "demo.yaml"), art=str(tmp / "home" / "artifacts"),
            folder=str(folder))], env=env, capture_output=True, text=True)
        inproc_s = float(inproc.stdout.strip().splitlines()[-1]) if inproc.returncode == 0 else None
    case = f"demo-{n_q}-queries"
    score_med = statistics.median(score_s)
    rows = [{"case": case, "system": "full_rerun", "metric": "seconds", "value": full_s, "runs": 1},
            {"case": case, "system": "provenance_score_cli", "metric": "seconds", "value": score_med, "runs": repeats},
            {"case": case, "system": "provenance_score_in_process", "metric": "seconds", "value": inproc_s, "runs": 1}]
    ratios = [{"case": case, "metric": "seconds", "of": "provenance_score_cli", "over": "full_rerun",
               "value": full_s / score_med}]
    from ops.spec import load_spec_file

    demo = load_spec_file(ROOT / "experiments" / "demo.yaml")
    print(f"\n{n_q} new query images against the demo (digits, {demo.trak.num_models} TRAK checkpoints, "
          f"{demo.subsets.num_models + demo.subsets.num_heldout + 1} models), {os.cpu_count()} cores")
    print(f"{'system':<34}{'seconds':>10}")
    print(f"{'full re-run (./provenance run demo)':<34}{full_s:>10.1f}")
    print(f"{'./provenance score (median of ' + str(repeats) + ')':<34}{score_med:>10.1f}")
    if inproc_s is not None:
        print(f"{'score_queries in-process':<34}{inproc_s:>10.2f}")
    print(f"full re-run / score: {full_s / score_med:.1f}x (target >= 20x)")
    write_results("new_data", {"experiment": "demo", "queries": n_q, "repeats": repeats}, rows, ratios,
                  quick=args.quick)


if __name__ == "__main__":
    main()
