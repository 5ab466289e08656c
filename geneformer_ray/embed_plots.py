"""Pictures of cell embeddings (PNG, written atomically): a UMAP coloured by a metadata column, and a
heatmap of the embedding dimensions with cells grouped by a label column."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geneformer_ray.evaluate import _pyplot, _save_figure

MAX_HEATMAP_CELLS = 2_000  # rows of the heatmap image; larger groups are subsampled (seeded), proportionally


def umap_coordinates(embeddings: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(cells, 2) UMAP of the embeddings (cosine metric; seeded, so single-threaded and reproducible)."""
    import umap

    neighbours = int(min(15, max(2, len(embeddings) - 1)))
    return umap.UMAP(n_neighbors=neighbours, min_dist=0.3, metric="cosine", random_state=seed, n_jobs=1).fit_transform(embeddings)


def plot_umap(embeddings: np.ndarray, values, path: str | Path, *, title: str, seed: int = 0) -> Path:
    """UMAP scatter coloured by ``values``: categories get a legend, numbers a colour bar."""
    import pandas as pd

    plt = _pyplot()
    xy = umap_coordinates(embeddings, seed=seed)
    values = pd.Series(values).reset_index(drop=True)
    name = values.name or "value"
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    size = max(2.0, min(20.0, 8000 / max(1, len(xy))))
    if pd.api.types.is_numeric_dtype(values) and values.nunique() > 20:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=values.to_numpy(float), s=size, cmap="viridis", linewidths=0)
        fig.colorbar(points, ax=ax, label=name)
    else:
        labels = values.astype(str)
        counts = labels.value_counts()
        colours = plt.get_cmap("tab20" if len(counts) > 10 else "tab10")
        for i, label in enumerate(counts.index):
            keep = (labels == label).to_numpy()
            ax.scatter(xy[keep, 0], xy[keep, 1], s=size, color=colours(i % colours.N), linewidths=0,
                       label=f"{label} ({counts[label]})")
        ax.legend(title=name, fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\n{len(xy):,} cells coloured by {name}", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def heatmap_rows(labels, *, max_cells: int = MAX_HEATMAP_CELLS, seed: int = 0) -> np.ndarray:
    """Row indices grouped by label (largest group first), each group subsampled in proportion."""
    import pandas as pd

    labels = pd.Series(labels).astype(str).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    share = min(1.0, max_cells / max(1, len(labels)))
    rows = []
    for label in labels.value_counts().index:
        members = np.flatnonzero((labels == label).to_numpy())
        take = max(1, int(round(len(members) * share)))
        rows.append(np.sort(rng.choice(members, take, replace=False)) if take < len(members) else members)
    return np.concatenate(rows)


def plot_heatmap(embeddings: np.ndarray, labels, path: str | Path, *, title: str, seed: int = 0) -> Path:
    """Cells (rows, grouped by label) x embedding dimensions (columns, ordered by hierarchical
    clustering), each dimension standardised across cells; a colour strip marks the groups."""
    import pandas as pd
    from scipy.cluster.hierarchy import leaves_list, linkage

    plt = _pyplot()
    labels = pd.Series(labels).astype(str).reset_index(drop=True)
    rows = heatmap_rows(labels, seed=seed)
    matrix = embeddings[rows]
    matrix = (matrix - matrix.mean(0)) / np.where(matrix.std(0) > 0, matrix.std(0), 1.0)
    columns = leaves_list(linkage(matrix.T, "average", metric="correlation")) if matrix.shape[0] > 1 else np.arange(matrix.shape[1])
    groups = labels[rows].to_numpy()
    names = list(dict.fromkeys(groups))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, (strip, ax) = plt.subplots(1, 2, figsize=(9, 6), dpi=120, gridspec_kw={"width_ratios": [1, 30], "wspace": 0.02})
    strip.imshow(np.array([names.index(g) for g in groups])[:, None] % colours.N, aspect="auto", cmap=colours,
                 vmin=0, vmax=colours.N - 1, interpolation="nearest")
    strip.set_xticks([])
    edges = np.r_[0, np.cumsum([np.sum(groups == n) for n in names])]
    strip.set_yticks((edges[:-1] + edges[1:]) / 2, [f"{n} ({e1 - e0})" for n, e0, e1 in zip(names, edges[:-1], edges[1:])],
                     fontsize=7)
    image = ax.imshow(matrix[:, columns], aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    for edge in edges[1:-1]:
        ax.axhline(edge - 0.5, color="black", linewidth=0.6)
    ax.set_yticks([])
    ax.set_xlabel("embedding dimension (clustered)")
    ax.set_title(f"{title}\n{len(rows):,} cells grouped by {labels.name or 'label'} (z-scored per dimension)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="z-score")
    return _save_figure(fig, Path(path))
