"""Saving a matplotlib figure as a run output: written atomically (a reader never sees half a
PNG), and the figure closed whatever happens."""

from __future__ import annotations

import os

from lm_human_preferences.language.checkpoints import atomic_writer


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> None:
    """`fig` as a PNG at `path` (replacing it atomically), then closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_writer(path) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)
