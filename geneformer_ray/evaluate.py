"""Metrics and plots (PNG) shared by training, fine-tuning and tuning."""

from __future__ import annotations

from pathlib import Path


def plot_curve(points: list[tuple[int, float]], path: str | Path, *, title: str, ylabel: str,
               extra: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """A line plot of (step, value) points, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
