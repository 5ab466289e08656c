"""Statistics of an in-silico perturbation run: every mode of Geneformer's InSilicoPerturberStats, on the
run's ``shifts/`` (and ``gene_shifts/``) parts.

    geneformer-ray perturb-stats runs/perturb --mode goal_state_shift|vs_random|vs_null|mixture_model|aggregate_data|aggregate_gene_shifts \
        [--null-run runs/perturb_null] [--genes CD74 ...] [--metric shift|cell_shift|shift_to_goal ...]

  vs_random              per gene: its shifts against the run's null rows (random genes of the same cells
                         perturbed the same way), two-sided Mann-Whitney U, Benjamini-Hochberg FDR (the
                         default without states)
  goal_state_shift       per gene: mean shift towards the goal (and each alternative) state, against the
                         random distribution (every perturbed gene's shifts pooled, as Geneformer; with a
                         gene list, the null rows), Wilcoxon rank-sum, BH FDR (the default with states)
  vs_null                per gene: its shifts against the same gene's in another run (``--null-run``: e.g.
                         the same perturbation in control cells), rank-sum, BH FDR
  mixture_model          a two-component Gaussian mixture fitted to the genes' mean shifts: which genes are
                         impactful (the component of larger shift), and the share of each gene's cells in
                         it; with an anchor, Geneformer's combination columns (anchor, gene, sum, combo,
                         combo - sum)
  aggregate_data         the raw per-cell shifts of the given genes (or of the gene set)
  aggregate_gene_shifts  cell-and-gene runs: per (perturbed gene, affected gene) the mean, sd and count of
                         the affected gene's cosine, aggregated one part at a time (never the whole table)
Values are shifts (1 - Geneformer's cosine, or the cosine gains towards a state): larger = more effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import false_discovery_control, mannwhitneyu, ranksums

from geneformer_ray.files import atomic_file, write_text_atomic
from geneformer_ray.infer.perturb_plan import GENE_TABLE_MODES, GROUP, MIN_CELLS, ORIGINAL, resolve_genes
from geneformer_ray.infer.perturb_plan import STATS_MODES as MODES
from geneformer_ray.infer.plots import plot_gene_pairs, plot_significance
from geneformer_ray.models.folders import model_vocab, read_model_config
RANDOM_SAMPLE = 100_000  # the pooled random distribution is subsampled to this (seeded), as Geneformer does
TESTED_ROLES = ("gene", "group", "combo")

__all__ = ["GROUP", "MIN_CELLS", "MODES", "ORIGINAL", "aggregate_data", "aggregate_gene_shifts", "benjamini_hochberg",
           "finish_statistics", "gene_statistics", "goal_state_shift", "mixture_model", "read_shifts", "run_stats",
           "vs_null"]


def read_shifts(folder: str | Path) -> pd.DataFrame:
    """Every part of a run's ``shifts/`` folder as one DataFrame (a row per cell and perturbation)."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame({"cell_id": [], "role": [], "gene_token": [], "perturbed": [], "cosine": [], "shift": [],
                             "cell_shift": []})
    frame = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    frame["key"] = frame["perturbed"].map(tuple)
    return frame.drop_duplicates(["cell_id", "role", "gene_token", "key"], ignore_index=True).drop(columns="key")


def benjamini_hochberg(p_values) -> np.ndarray:
    """BH-adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, np.float64)
    adjusted = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = false_discovery_control(p[tested], method="bh")
    return adjusted


def _tested(shifts: pd.DataFrame) -> pd.DataFrame:
    return shifts[shifts["role"].isin(TESTED_ROLES)]


def gene_statistics(shifts, vocab=None, *, metric: str = "shift", min_cells: int = MIN_CELLS) -> pd.DataFrame:
    """``vs_random``: one row per perturbed gene (or combination, or the set): cells, mean/median of
    ``metric``, the null's mean, the U-test p-value against the null rows, BH FDR; sorted by FDR, then effect."""
    null = shifts.loc[shifts["role"] == "null", metric].dropna().to_numpy()
    rows = []
    for (role, token), group in _tested(shifts).groupby(["role", "gene_token"], sort=True):
        values = group[metric].dropna().to_numpy()
        test = values.size >= min_cells and null.size >= min_cells
        rows.append({"role": role, "gene_token": int(token), "cells": int(values.size), f"mean_{metric}": float(values.mean()),
                     f"median_{metric}": float(np.median(values)),
                     **({"mean_shift": float(group["shift"].mean())} if metric != "shift" else {}),
                     f"null_mean_{metric}": float(null.mean()) if null.size else np.nan,
                     "p_value": float(mannwhitneyu(values, null, alternative="two-sided").pvalue) if test else np.nan})
    stats = pd.DataFrame(rows, columns=["role", "gene_token", "cells", f"mean_{metric}", f"median_{metric}",
                                        *(["mean_shift"] if metric != "shift" else []), f"null_mean_{metric}", "p_value"])
    stats = _named(stats, vocab)
    stats["fdr"] = benjamini_hochberg(stats["p_value"])
    effect = (stats[f"mean_{metric}"] - stats[f"null_mean_{metric}"]).abs()
    return stats.assign(_effect=-effect).sort_values(["fdr", "_effect"], na_position="last", ignore_index=True).drop(columns="_effect")


def goal_state_shift(shifts, vocab=None, *, states: list[str], all_genes: bool, seed: int = 0,
                     min_cells: int = MIN_CELLS) -> pd.DataFrame:
    """Geneformer's ``goal_state_shift``: per gene the mean shift towards the goal and each alternative
    state, each against the random distribution (all genes' shifts pooled; with a gene list, the null
    rows), Wilcoxon rank-sum, BH FDR per state; significant genes first, by shift towards the goal."""
    tested = _tested(shifts)
    pool = tested if all_genes else shifts[shifts["role"] == "null"]
    rng = np.random.default_rng(seed)
    random = {}
    for state in states:
        values = pool[f"shift_to_{state}"].dropna().to_numpy()
        random[state] = rng.choice(values, RANDOM_SAMPLE, replace=False) if values.size > RANDOM_SAMPLE else values
    rows = []
    for (role, token), group in tested.groupby(["role", "gene_token"], sort=True):
        row = {"role": role, "gene_token": int(token), "cells": len(group)}
        for state in states:
            values = group[f"shift_to_{state}"].to_numpy()
            row[f"mean_shift_to_{state}"] = float(values.mean())
            row[f"null_mean_shift_to_{state}"] = float(random[state].mean()) if random[state].size else np.nan
            usable = values.size >= min_cells and random[state].size >= min_cells
            row[f"p_value{_suffix(state)}"] = float(ranksums(random[state], values).pvalue) if usable else np.nan
        rows.append(row)
    stats = _named(pd.DataFrame(rows, columns=["role", "gene_token", "cells"] + [
        c for s in states for c in (f"mean_shift_to_{s}", f"null_mean_shift_to_{s}", f"p_value{_suffix(s)}")]), vocab)
    for state in states:
        stats[f"fdr{_suffix(state)}"] = benjamini_hochberg(stats[f"p_value{_suffix(state)}"])
    stats["significant"] = stats["fdr"] < 0.05
    return stats.sort_values(["significant", "mean_shift_to_goal", "fdr"], ascending=[False, False, True],
                             na_position="last", ignore_index=True)


def _suffix(state: str) -> str:
    return "" if state == "goal" else f"_{state}"


def vs_null(shifts, null_shifts, vocab=None, *, metric: str = "shift") -> pd.DataFrame:
    """Geneformer's ``vs_null``: each gene's shifts against the same gene's shifts in a null run
    (rank-sum; a gene missing from the null gets p = 1, as Geneformer's NaN -> 1), BH FDR."""
    null = _tested(null_shifts).groupby(["role", "gene_token"])[metric]
    null_values = {key: group.dropna().to_numpy() for key, group in null}
    rows = []
    for (role, token), group in _tested(shifts).groupby(["role", "gene_token"], sort=True):
        test = group[metric].dropna().to_numpy()
        other = null_values.get((role, token), np.zeros(0))
        p = float(ranksums(test, other).pvalue) if test.size and other.size else 1.0
        rows.append({"role": role, "gene_token": int(token), "cells": int(test.size), "null_cells": int(other.size),
                     f"mean_{metric}": float(test.mean()), f"null_mean_{metric}": float(other.mean()) if other.size else np.nan,
                     f"mean_{metric}_minus_null": float(test.mean() - other.mean()) if other.size else np.nan,
                     "p_value": 1.0 if np.isnan(p) else p})
    stats = _named(pd.DataFrame(rows, columns=["role", "gene_token", "cells", "null_cells", f"mean_{metric}",
                                               f"null_mean_{metric}", f"mean_{metric}_minus_null", "p_value"]), vocab)
    stats["fdr"] = benjamini_hochberg(stats["p_value"])
    stats["significant"] = stats["fdr"] < 0.05
    return stats.sort_values(["significant", f"mean_{metric}_minus_null"], ascending=[False, False], ignore_index=True)


def mixture_model(shifts, vocab=None, *, metric: str = "shift", seed: int = 0) -> pd.DataFrame:
    """Geneformer's ``mixture_model``: two Gaussian components fitted to the genes' mean shifts; a gene is
    impactful when its mean falls in the component of larger shift (beyond that component's mean it
    always is; below the other's never), and ``impact_percent`` is the share of its cells that do. With
    an anchor (``combo`` rows) the genes are the pairs, and Geneformer's combination columns are added:
    anchor, gene alone, their sum, the pair, pair - sum (shifts add where the effects are independent)."""
    from sklearn.mixture import GaussianMixture

    combos = (shifts["role"] == "combo").any()
    tests = shifts[shifts["role"] == ("combo" if combos else "gene")]
    if tests.empty:
        tests = _tested(shifts)
    means = tests.groupby("gene_token")[metric].mean()
    if len(means) < 2:
        raise ValueError(f"the mixture model needs the mean shifts of at least 2 genes; this run has {len(means)}: "
                         "perturb more genes (--all-genes)")
    model = GaussianMixture(n_components=2, random_state=seed).fit(means.to_numpy().reshape(-1, 1))
    low, high = np.sort(model.means_.ravel())
    impact_label = int(np.argmax(model.means_.ravel()))

    def impactful(values: np.ndarray) -> np.ndarray:
        guess = model.predict(values.reshape(-1, 1)) == impact_label
        return np.where(values >= high, True, np.where(values <= low, False, guess))

    rows = []
    anchor = shifts.loc[shifts["role"] == "anchor"].set_index("cell_id")[metric] if combos else None
    alone = shifts.loc[shifts["role"] == "gene"].set_index(["cell_id", "gene_token"])[metric] if combos else None
    for token, group in tests.groupby("gene_token", sort=True):
        values = group[metric].to_numpy()
        row = {"gene_token": int(token), "cells": int(values.size), f"mean_{metric}": float(values.mean()),
               "impactful": bool(impactful(np.array([values.mean()]))[0]),
               "impact_percent": float(100 * impactful(values).mean())}
        if combos:
            a = anchor.reindex(group["cell_id"]).to_numpy()
            g = alone.reindex(list(zip(group["cell_id"], group["gene_token"]))).to_numpy()
            row.update({"anchor_shift": float(np.nanmean(a)), "gene_shift": float(np.nanmean(g)),
                        "sum_of_shifts": float(np.nanmean(a + g)), "combo_shift": float(values.mean()),
                        "combo_minus_sum": float(np.nanmean(values - (a + g)))})
        rows.append(row)
    stats = _named(pd.DataFrame(rows), vocab)
    order = "combo_minus_sum" if combos else f"mean_{metric}"
    return stats.sort_values(["impactful", order], ascending=[False, False], ignore_index=True)


def aggregate_data(shifts, vocab=None, *, genes: list[int] | None = None, metric: str = "shift") -> pd.DataFrame:
    """Geneformer's ``aggregate_data``: the raw per-cell shifts of the given gene tokens (all tested rows
    when None), named."""
    rows = _tested(shifts)
    if genes:
        rows = rows[rows["gene_token"].isin(genes)]
    if rows.empty:
        raise ValueError(f"aggregate_data: no cell of this run has a perturbation of {genes}; pass genes the run perturbed")
    columns = ["cell_id", "role", "gene_token", metric] + [c for c in rows.columns if c.startswith("shift_to_") and c != metric]
    return _named(rows[list(dict.fromkeys(columns))].reset_index(drop=True), vocab)


def aggregate_gene_shifts(folder: str | Path, vocab=None) -> pd.DataFrame:
    """Geneformer's ``aggregate_gene_shifts`` for cell-and-gene runs: per (role, perturbed, affected)
    the mean, sd and count of the affected gene's cosine (and the mean shift, 1 - cosine), summed one
    part at a time, so memory is one part plus the pairs seen."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"aggregate_gene_shifts: {folder} holds no gene shifts; run perturb with --emb-mode cell_and_gene or cls_and_gene")
    keys = ["role", "perturbed", "affected"]
    totals = None
    for part in parts:
        table = pq.read_table(part, columns=[*keys, "cosine"])
        cosine = table.column("cosine").cast(pa.float64())
        table = table.set_column(table.schema.get_field_index("cosine"), "cosine", cosine).append_column(
            "square", pa.compute.multiply(cosine, cosine))
        partial = table.group_by(keys).aggregate([("cosine", "sum"), ("square", "sum"), ("cosine", "count")])
        totals = partial if totals is None else pa.concat_tables([totals, partial]).group_by(keys).aggregate(
            [("cosine_sum", "sum"), ("square_sum", "sum"), ("cosine_count", "sum")]).rename_columns(
            [*keys, "cosine_sum", "square_sum", "cosine_count"])
    frame = totals.to_pandas()
    n = frame["cosine_count"].to_numpy(np.float64)
    mean = frame["cosine_sum"].to_numpy() / n
    var = np.maximum(frame["square_sum"].to_numpy() / n - mean**2, 0.0) * n / np.maximum(n - 1, 1)
    table = pd.DataFrame({"role": frame["role"], "perturbed": frame["perturbed"].astype(np.int64),
                          "affected": frame["affected"].astype(np.int64), "cells": n.astype(np.int64),
                          "mean_cosine": mean, "sd_cosine": np.sqrt(var), "mean_shift": 1.0 - mean})
    names = _lookup(vocab)
    table.insert(2, "perturbed_symbol", [names(t)[1] for t in table["perturbed"]])
    table.insert(4, "affected_symbol", [names(t)[1] for t in table["affected"]])
    return table.sort_values(["mean_shift", "cells"], ascending=[False, False], ignore_index=True)


def run_stats(run: str | Path, mode: str, *, null_run: str | Path | None = None, genes: list[str] | None = None,
              metric: str | None = None) -> pd.DataFrame:
    """One statistics mode on a finished run folder (what ``perturb-stats`` prints and writes)."""
    run = Path(run)
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    state = run / "perturb.json"
    if not state.exists():
        raise ValueError(f"{run} holds no perturbation run (no perturb.json); pass the --out folder of geneformer-ray perturb")
    params = json.loads(state.read_text())["params"]
    vocab = model_vocab(read_model_config(params["model"]))
    metric = metric or _default_metric(params)
    if mode == "aggregate_gene_shifts":
        return aggregate_gene_shifts(run / "gene_shifts", vocab)
    shifts = read_shifts(run / "shifts")
    if metric not in shifts.columns:
        raise ValueError(f"--metric {metric!r}: this run recorded {[c for c in shifts.columns if 'shift' in c]}")
    if mode == "vs_random":
        return gene_statistics(shifts, vocab, metric=metric)
    if mode == "goal_state_shift":
        if params.get("goal_state") is None:
            raise ValueError("goal_state_shift needs a run with --start-state and --goal-state")
        return goal_state_shift(shifts, vocab, states=_state_labels(params), all_genes=not params["genes"])
    if mode == "vs_null":
        if null_run is None or not (Path(null_run) / "shifts").exists():
            raise ValueError(f"vs_null compares with another run: pass --null-run FOLDER (a perturb --out folder), not {null_run}")
        return vs_null(shifts, read_shifts(Path(null_run) / "shifts"), vocab, metric=metric)
    if mode == "mixture_model":
        return mixture_model(shifts, vocab, metric=metric)
    tokens = [vocab.token_ids[g] for g in resolve_genes(genes, vocab)] if genes else None
    return aggregate_data(shifts, vocab, genes=tokens, metric=metric)


def finish_statistics(out: Path, shifts: pd.DataFrame, params, vocab, *, title: str) -> dict:
    """The statistics a run writes when it ends: ``gene_stats.csv`` (goal_state_shift with states, else
    vs_random), ``impact_mixture.csv`` for all-genes and anchor runs, ``gene_pair_shifts.parquet`` in
    cell-and-gene mode, and their plots. Returns the summary's figures."""
    metric = params.metric
    if params.goal_state is not None:
        stats = goal_state_shift(shifts, vocab, states=list(params.states), all_genes=params.all_genes, seed=params.seed)
    else:
        stats = gene_statistics(shifts, vocab, metric=metric)
    write_text_atomic(out / "gene_stats.csv", stats.to_csv(index=False))
    plot_significance(stats, out / "shift_vs_significance.png", metric=metric, title=title)
    summary = {"metric": metric, "genes_tested": int(stats["p_value"].notna().sum()),
               "genes_fdr_below_0.05": int((stats["fdr"] < 0.05).sum()), "tables": ["gene_stats.csv"]}
    if params.all_genes or params.anchor:
        means = _tested(shifts).groupby("gene_token").size()
        if len(means) >= 10:
            write_text_atomic(out / "impact_mixture.csv", mixture_model(shifts, vocab, metric=metric).to_csv(index=False))
            summary["tables"].append("impact_mixture.csv")
    if params.emb_mode in GENE_TABLE_MODES and (out / "gene_shifts").exists():
        pairs = aggregate_gene_shifts(out / "gene_shifts", vocab)
        with atomic_file(out / "gene_pair_shifts.parquet") as tmp:
            pairs.to_parquet(tmp, index=False)
        plot_gene_pairs(pairs, out / "gene_pair_heatmap.png", title=title)
        summary["tables"].append("gene_pair_shifts.parquet")
        summary["gene_pairs"] = len(pairs)
    return summary


def _default_metric(params: dict) -> str:
    if params.get("goal_state") is not None:
        return "shift_to_goal"
    return "cell_shift" if params.get("measure") == "cell-shift" else "shift"


def _state_labels(params: dict) -> list[str]:
    return ["start", "goal", *(f"alt{i}" for i in range(1, len(params.get("alt_states") or []) + 1))]


def _lookup(vocab):
    by_token = {} if vocab is None else {t: g for g, t in vocab.token_ids.items()}

    def names(token: int) -> tuple[str, str]:
        if token == GROUP:
            return "gene set", "gene set"
        gene = by_token.get(int(token), str(token))
        return gene, ("" if vocab is None else vocab.gene_symbols.get(gene, ""))

    return names


def _named(stats: pd.DataFrame, vocab) -> pd.DataFrame:
    names = _lookup(vocab)
    pairs = [names(t) for t in stats["gene_token"]]
    stats.insert(0, "symbol", [p[1] for p in pairs])
    stats.insert(0, "gene", [p[0] for p in pairs])
    return stats
