"""Figures for asset metadata: a headless matplotlib figure, and its PNG written atomically."""
from __future__ import annotations

from pathlib import Path


def figure(figsize=(5, 3.4), ncols: int = 1):
    """(fig, axes) on the Agg backend; ``axes`` is one Axes, or a list of ``ncols`` of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=100, squeeze=False)
    return fig, (axes[0][0] if ncols == 1 else list(axes[0]))


def save(fig, dest) -> Path:
    """The figure as PNG at ``dest`` (a temporary file renamed into place), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(dest)
    return dest
