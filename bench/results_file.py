"""The results file every bench/<name>.py writes (shape: shared BENCH.md) and the machine it ran on."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "torch": torch.__version__}


def write_results(bench: str, config: dict, results: list, ratios: list, quick: bool = False, tag: str = "") -> Path:
    """Write bench/results/<bench><tag>[-quick].json and say where."""
    out = {"bench": bench, "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
           "config": config, "results": results, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{bench}{tag}{'-quick' if quick else ''}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")
    return dest
