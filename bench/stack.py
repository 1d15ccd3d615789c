"""Collecting models into the stacked checkpoint: peak memory, streaming against in memory.

``collect_models`` writes every model of an experiment into one ``models.safetensors`` ([M, ...]
per tensor).  The peer here is the obvious way, and what provenance did before: load every model,
``torch.stack``, safetensors' ``save_file`` (kernels.stacked.write_stacked_reference); it holds all
M models, twice (the loaded list and the stacked copy).  provenance's ``write_stacked`` copies one tensor of
one model at a time.  Each system runs in its own process (peak RSS is a process's high-water
mark), on the same M files of the repository's CIFAR-shaped ResNet-9 (random weights), and both
outputs are checked equal.

    python bench/stack.py              # M = 128 ResNet-9s (8.7 MiB each, 1.1 GiB stacked)
    python bench/stack.py --quick      # M = 16
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(system: str, work: Path) -> None:
    """Stack work/m*.safetensors with one system; print seconds and this process's peak RSS."""
    from kernels.stacked import write_stacked, write_stacked_reference

    sources = sorted(work.glob("m*.safetensors"))
    t0 = time.perf_counter()
    (write_stacked if system == "streaming" else write_stacked_reference)(sources, work / f"{system}.out",
                                                                           {"models": len(sources)})
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SYSTEM", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bench.results_file import write_results
    from kernels.models import build_model

    m = 16 if args.quick else args.models
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        work = Path(tmp)
        for i in range(m):
            torch.manual_seed(i)
            model = build_model("resnet9", (3, 32, 32), 10)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / f"m{i:04d}.safetensors"))
        per_model = sum(f.stat().st_size for f in work.glob("m*.safetensors")) / m / 2**20
        runs = {"streaming": [], "in_memory": []}
        for _ in range(args.repeats):              # alternate: the machine's drift falls on both
            for system in runs:
                out = subprocess.run([sys.executable, __file__, "--child", system, str(work)], check=True,
                                     capture_output=True, text=True).stdout
                runs[system].append(json.loads(out.strip().splitlines()[-1]))
        with safe_open(str(work / "streaming.out"), framework="pt") as a, \
                safe_open(str(work / "in_memory.out"), framework="pt") as b:
            assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), "outputs differ"
        stacked = (work / "streaming.out").stat().st_size / 2**30
    case = f"resnet9-M{m}"
    rows, table = [], []
    for system, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        rss = statistics.median(r["peak_rss_gib"] for r in rs)
        rows += [{"case": case, "system": f"{'provenance' if system == 'streaming' else 'torch.stack+save_file'}",
                  "metric": metric, "value": v, "runs": len(rs)} for metric, v in (("seconds", sec), ("peak_rss_gib", rss))]
        table.append((system, sec, rss))
    (s_sec, s_rss), (r_sec, r_rss) = (t[1:] for t in table)
    peer = "torch.stack+save_file"      # ratios are peer / ours for both (lower is better for both)
    ratios = [{"case": case, "metric": "peak_rss_gib", "of": "provenance", "over": peer, "value": r_rss / s_rss},
              {"case": case, "metric": "seconds", "of": "provenance", "over": peer, "value": r_sec / s_sec}]
    print(f"\n{m} ResNet-9s, {per_model:.1f} MiB each, {stacked:.2f} GiB stacked; medians of {args.repeats}")
    print(f"{'system':<14}{'seconds':>10}{'peak RSS GiB':>14}")
    for system, sec, rss in table:
        print(f"{system:<14}{sec:>10.2f}{rss:>14.2f}")
    print(f"peak RSS: in-memory / streaming = {r_rss / s_rss:.1f}x; time: {r_sec / s_sec:.2f}x")
    write_results("stack", {"models": m, "arch": "resnet9", "per_model_mib": per_model, "stacked_gib": stacked,
                            "repeats": args.repeats}, rows, ratios, quick=args.quick)


if __name__ == "__main__":
    main()
