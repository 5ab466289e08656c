"""Pictures of inference results (PNG, written atomically): a UMAP of cell embeddings coloured by a
metadata column, a heatmap of the embedding dimensions with cells grouped by a label column, and a
perturbation's shift against its significance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list, linkage

from geneformer_ray.infer.perturb_plan import MIN_CELLS
from geneformer_ray.plots import pyplot, save_figure

MAX_HEATMAP_CELLS = 2_000  # rows of the heatmap image; larger groups are subsampled (seeded), proportionally


def umap_coordinates(embeddings: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(cells, 2) UMAP of the embeddings (cosine metric; seeded, so single-threaded and reproducible)."""
    import umap  # lazy: its first import compiles numba code (~20 s); only UMAP plots need it

    neighbours = int(min(15, max(2, len(embeddings) - 1)))
    return umap.UMAP(n_neighbors=neighbours, min_dist=0.3, metric="cosine", random_state=seed, n_jobs=1).fit_transform(embeddings)


def plot_umap(embeddings: np.ndarray, values, path: str | Path, *, title: str, seed: int = 0) -> Path:
    """UMAP scatter coloured by ``values``: categories get a legend, numbers a colour bar."""
    plt = pyplot()
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
    return save_figure(fig, Path(path))


def heatmap_rows(labels, *, max_cells: int = MAX_HEATMAP_CELLS, seed: int = 0) -> np.ndarray:
    """Row indices grouped by label (largest group first), each group subsampled in proportion."""
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
    plt = pyplot()
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
    return save_figure(fig, Path(path))


def plot_significance(stats, path: str | Path, *, metric: str, title: str, fdr: float = 0.05, label_top: int = 12) -> Path:
    """Each gene's mean shift (x) against -log10 FDR (y); genes under ``fdr`` highlighted, the top ones named."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    tested = stats[stats["fdr"].notna()]
    x = tested[f"mean_{metric}"].to_numpy()
    y = -np.log10(np.clip(tested["fdr"].to_numpy(), 1e-300, 1))
    hit = tested["fdr"].to_numpy() < fdr
    ax.scatter(x[~hit], y[~hit], s=10, color="0.6", linewidths=0, label=f"FDR >= {fdr}")
    ax.scatter(x[hit], y[hit], s=14, color="tab:red", linewidths=0, label=f"FDR < {fdr} ({hit.sum()})")
    for _, row in tested[hit].head(label_top).iterrows():  # the most significant hits, by name
        ax.annotate(row["symbol"] or row["gene"], (row[f"mean_{metric}"], -np.log10(max(row["fdr"], 1e-300))), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    if len(tested):
        ax.axvline(float(tested[f"null_mean_{metric}"].iloc[0]), color="black", linewidth=0.6, linestyle="--",
                   label="null mean")
    ax.axhline(-np.log10(fdr), color="tab:red", linewidth=0.6, linestyle=":")
    ax.set_xlabel({"shift": "mean shift (1 - mean cosine of the remaining genes, Geneformer)",
                   "cell_shift": "mean shift (1 - cosine of mean-pooled cell embeddings)",
                   "shift_to_goal": "mean shift towards the goal state (cosine gain)"}.get(metric, metric))
    ax.set_ylabel("-log10 FDR (rank test vs random, BH)")
    ax.set_title(f"{title}\n{len(tested):,} genes tested, {len(stats) - len(tested):,} in fewer than {MIN_CELLS} cells",
                 fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_gene_pairs(pairs, path: str | Path, *, title: str, top: int = 30, min_cells: int = MIN_CELLS) -> Path:
    """The gene-network picture of a cell-and-gene run: mean shift of each affected gene's own embedding
    (columns) when a gene is perturbed (rows), for the perturbed and affected genes with the largest
    shifts among pairs seen in at least ``min_cells`` cells."""
    plt = pyplot()
    seen = pairs[(pairs["cells"] >= min_cells) & (pairs["role"] != "combo")]
    if seen.empty:
        seen = pairs[pairs["role"] != "combo"]
    rows = seen.groupby("perturbed")["mean_shift"].max().nlargest(top).index
    cols = seen[seen["perturbed"].isin(rows)].groupby("affected")["mean_shift"].max().nlargest(top).index
    grid = seen.pivot_table(index="perturbed", columns="affected", values="mean_shift", aggfunc="mean").reindex(
        index=rows, columns=cols)
    label = dict(zip(pairs["perturbed"], pairs["perturbed_symbol"])) | dict(zip(pairs["affected"], pairs["affected_symbol"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(cols) + 3), max(4.5, 0.28 * len(rows) + 2)), dpi=120)
    image = ax.imshow(grid.to_numpy(float), aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(cols)), [label.get(c) or str(c) for c in cols], rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), [label.get(r) or str(r) for r in rows], fontsize=6)
    ax.set_xlabel("affected gene")
    ax.set_ylabel("perturbed gene")
    fig.colorbar(image, ax=ax, label="mean shift of the affected gene (1 - cosine)")
    ax.set_title(f"{title}\n{len(pairs):,} gene pairs; blank: not seen together in {min_cells}+ cells", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))
