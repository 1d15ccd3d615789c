"""Progress bars for the long stages (training, featurization, the detector's search), on the
terminal only: shown when standard error is a terminal (``./provenance run`` by hand) or when
``PROVENANCE_PROGRESS=1``, never in Dagster's compute logs or CI output unless asked
(``PROVENANCE_PROGRESS=0`` turns them off everywhere).  The stages' log lines stay as they are."""
from __future__ import annotations

import os
import sys


def enabled() -> bool:
    want = os.environ.get("PROVENANCE_PROGRESS", "")
    if want in ("0", "1"):
        return want == "1"
    return sys.stderr.isatty()


def bar(total: int, desc: str, unit: str = "it"):
    """A tqdm bar on standard error (a disabled one that costs nothing where bars are off)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5)


def advance_to(b, n: int) -> None:
    """Move ``b`` forward to ``n`` (callbacks that report a position, not a step)."""
    if n > b.n:
        b.update(n - b.n)
