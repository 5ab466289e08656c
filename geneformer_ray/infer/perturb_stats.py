"""Statistics of an in-silico perturbation: per gene, its embedding shifts against the null's
(two-sided Mann-Whitney U, Benjamini-Hochberg FDR). The plot of shift against significance is
``geneformer_ray.infer.plots.plot_significance``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy.stats import false_discovery_control, mannwhitneyu

ORIGINAL = -1  # the gene_token of a row that records an unperturbed cell
MIN_CELLS = 3  # genes perturbed in fewer cells get no test


def read_shifts(folder: str | Path):
    """Every part of a run's ``shifts/`` folder as one DataFrame (a row per cell and perturbed gene)."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame({"cell_id": [], "gene_token": [], "is_null": [], "shift": [], "goal_shift": []})
    frame = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    return frame.drop_duplicates(["cell_id", "gene_token", "is_null"], ignore_index=True)


def benjamini_hochberg(p_values) -> np.ndarray:
    """BH-adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, np.float64)
    adjusted = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = false_discovery_control(p[tested], method="bh")
    return adjusted


def gene_statistics(shifts, vocab=None, *, metric: str = "shift", min_cells: int = MIN_CELLS):
    """One row per perturbed gene: cells, mean/median of ``metric`` (and of ``shift``), the null's mean,
    the U-test p-value against the null rows, BH FDR; sorted by FDR, then by effect."""
    genes = shifts[(shifts["gene_token"] != ORIGINAL) & ~shifts["is_null"]]
    null = shifts.loc[shifts["is_null"], metric].dropna().to_numpy()
    rows = []
    for token, group in genes.groupby("gene_token", sort=True):
        values = group[metric].dropna().to_numpy()
        test = values.size >= min_cells and null.size >= min_cells
        rows.append({"gene_token": int(token), "cells": int(values.size), f"mean_{metric}": float(values.mean()),
                     f"median_{metric}": float(np.median(values)), **({"mean_shift": float(group["shift"].mean())}
                                                                       if metric != "shift" else {}),
                     f"null_mean_{metric}": float(null.mean()) if null.size else np.nan,
                     "p_value": float(mannwhitneyu(values, null, alternative="two-sided").pvalue) if test else np.nan})
    stats = pd.DataFrame(rows, columns=["gene_token", "cells", f"mean_{metric}", f"median_{metric}",
                                        *(["mean_shift"] if metric != "shift" else []), f"null_mean_{metric}", "p_value"])
    stats.insert(0, "symbol", _names(stats["gene_token"], vocab, symbols=True))
    stats.insert(0, "gene", _names(stats["gene_token"], vocab, symbols=False))
    stats["fdr"] = benjamini_hochberg(stats["p_value"])
    effect = (stats[f"mean_{metric}"] - stats[f"null_mean_{metric}"]).abs()
    return stats.assign(_effect=-effect).sort_values(["fdr", "_effect"], na_position="last", ignore_index=True).drop(columns="_effect")


def _names(tokens, vocab, *, symbols: bool) -> list[str]:
    if vocab is None:
        return [str(t) for t in tokens]
    by_token = {t: g for g, t in vocab.token_ids.items()}
    ids = [by_token.get(int(t), str(t)) for t in tokens]
    return [vocab.gene_symbols.get(g, "") for g in ids] if symbols else ids
