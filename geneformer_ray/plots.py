"""Figures written as PNG files, atomically, without a display (the Agg backend).

    fig, ax = pyplot().subplots()
    ...
    save_figure(fig, "out/loss_curve.png")
    plot_curve([(10, 2.3), (20, 2.1)], "out/loss.png", title="run: MLM loss", ylabel="loss")
"""

from __future__ import annotations

from pathlib import Path

from geneformer_ray.files import atomic_file


def pyplot():
    """matplotlib's pyplot on the Agg backend (workers and CI have no display)."""
    import matplotlib  # lazy: matplotlib's import costs ~0.5 s, and most runs draw nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix) atomically and close it."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path


def plot_curve(points: list[tuple[int, float]], path: str | Path, *, title: str, ylabel: str,
               extra: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """A line plot of (step, value) points, written atomically as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = {ylabel: points, **(extra or {})}
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
