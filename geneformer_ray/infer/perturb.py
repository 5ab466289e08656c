"""In-silico perturbation: delete or over-express genes in each cell's rank encoding and measure how far
the cell's embedding moves, on a pool of model actors (Ray Data ``map_batches``).

    geneformer-ray perturb --model runs/quickstart/model --corpus runs/quickstart/corpus --out runs/perturb \
        (--genes ENSG... | SYMBOL... | --all-genes) --perturbation delete|overexpress \
        [--start-state cell_type=B --goal-state cell_type="CD14+ Mono"] [--max-cells 200]

For each cell (of the start state, if given) and each gene: the perturbed encoding (delete: the gene's
token removed; overexpress: the token moved to the front, or inserted there and the last gene dropped
at the input size), and its cell embedding (the mean of gene-token states at ``--layer``) against the
unperturbed cell's: ``shift`` = 1 - cosine similarity; with states, ``goal_shift`` = cos(perturbed,
goal) - cos(original, goal), where goal is the mean embedding of the goal state's cells (> 0: towards
it). All of a batch's perturbed copies go through the model in length-sorted sub-batches.

Null: per cell, ``--null-genes`` random genes of the cell perturbed the same way (with ``--all-genes``
they are drawn from the cell's perturbations already computed). Per gene: cells, mean shift (and goal
shift), a two-sided Mann-Whitney U test of its shifts against the null's, Benjamini-Hochberg FDR.

The output folder is resumable: each batch of cells lands in one ``shifts/part-*.parquet`` (written to
a temporary name, then renamed) and a re-run with the same parameters skips the cells already there.
Outputs: ``perturb.json`` (parameters, goal embedding), ``shifts/``, ``gene_stats.csv``,
``shift_vs_significance.png``, ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from tqdm import tqdm

from geneformer_ray.data.corpus import read_columns
from geneformer_ray.files import atomic_file, write_json, write_text_atomic
from geneformer_ray.infer.config import PerturbConfig
from geneformer_ray.infer.embed import Embedder
from geneformer_ray.infer.encoder import (
    CellEncoder,
    check_column_value,
    check_model_and_corpus,
    length_sorted_chunks,
    read_cells,
    read_cells_dataset,
    select_cells,
)
from geneformer_ray.infer.perturb_stats import ORIGINAL, gene_statistics, read_shifts
from geneformer_ray.infer.plots import plot_significance
from geneformer_ray.runtime import actor_pool, actor_resources, plan_actor_pool
from geneformer_ray.tracking import log_output_folder


@dataclass
class PerturbParams:
    """What defines a perturbation run; a resumed run must have the same."""

    model: str
    corpus: str
    perturbation: str
    genes: list[str] = field(default_factory=list)  # Ensembl IDs; empty = every gene of each cell
    start_state: list[str] | None = None  # [column, value]
    goal_state: list[str] | None = None
    layer: int = -1
    max_cells: int | None = None
    null_genes: int = 5
    seed: int = 0

    @property
    def all_genes(self) -> bool:
        return not self.genes


def perturbed_encoding(ids: np.ndarray, token: int, kind: str, *, cls_id: int | None, eos_id: int | None,
                       max_genes: int) -> np.ndarray:
    """The cell's tokens with ``token`` deleted, or moved (inserted) to the front of the genes; a V2
    cell keeps its <cls> first and <eos> last; an over-expressed cell is cut back to ``max_genes``."""
    start = 1 if cls_id is not None and ids.size and ids[0] == cls_id else 0
    end = ids.size - 1 if eos_id is not None and ids.size and ids[-1] == eos_id else ids.size
    genes = ids[start:end]
    rest = genes[genes != token]
    changed = rest if kind == "delete" else np.concatenate([np.array([token], ids.dtype), rest])[:max_genes]
    return np.concatenate([ids[:start], changed, ids[end:]])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, hidden) arrays (or one row broadcast)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


class Perturber:
    """A model actor for ``Dataset.map_batches``: perturbs every selected cell of a batch, writes the
    batch's rows to one part file (atomically) and returns a count."""

    def __init__(self, model_dir: str, plan: dict, params: dict, out: str, batch_size: int, goal: list | None):
        self.encoder = CellEncoder(model_dir, layer=params["layer"], plan=plan)
        self.params = PerturbParams(**params)
        self.targets = np.array([self.encoder.vocab.token_ids[g] for g in self.params.genes], np.int64)
        self.out, self.batch_size = Path(out), batch_size
        self.goal = None if goal is None else np.asarray(goal, np.float64)
        vocab = self.encoder.vocab
        self.cls_id, self.eos_id, self.max_genes = vocab.cls_id, vocab.eos_id, vocab.max_genes_per_cell
        self.special = np.array(sorted(vocab.special_token_ids.values()))

    def __call__(self, batch: dict) -> dict:
        rows = np.arange(len(batch["cell_id"]))
        copies, index, owners, tokens, null, copy_of = [], {}, [], [], [], []
        for row in rows:
            ids = np.asarray(batch["input_ids"][row], np.int64)
            for token, is_null in [(ORIGINAL, False), *self._plan(ids, str(batch["cell_id"][row]))]:
                if (row, token) not in index:  # --all-genes: null genes reuse the cell's own perturbations
                    index[row, token] = len(copies)
                    copies.append(ids if token == ORIGINAL else perturbed_encoding(
                        ids, token, self.params.perturbation, cls_id=self.cls_id, eos_id=self.eos_id,
                        max_genes=self.max_genes))
                owners.append(row)
                tokens.append(token)
                null.append(is_null)
                copy_of.append(index[row, token])
        embeddings = np.zeros((len(copies), self.encoder.hidden_size), np.float32)
        for chunk in length_sorted_chunks([len(c) for c in copies], self.batch_size):
            embeddings[chunk] = self.encoder.cell_embeddings([copies[i] for i in chunk])
        table = self._rows(batch, np.array(owners, np.int64), np.array(tokens, np.int64), np.array(null, bool),
                           embeddings[np.array(copy_of, np.int64)] if copy_of else embeddings)
        if rows.size:
            self._write(table, [str(batch["cell_id"][r]) for r in rows])
        return {"cells": np.array([rows.size]), "perturbations": np.array([len(copies) - rows.size])}

    def _plan(self, ids: np.ndarray, cell_id: str) -> list[tuple[int, bool]]:
        """(token, is_null) pairs to perturb in one cell; null genes are seeded by the cell id."""
        genes = ids[~np.isin(ids, self.special)]
        if self.params.perturbation == "delete" and genes.size < 2:
            return []  # nothing would be left to embed
        if self.params.all_genes:
            targets, pool = genes, genes
        else:
            targets = self.targets if self.params.perturbation == "overexpress" else self.targets[np.isin(self.targets, genes)]
            pool = genes[~np.isin(genes, self.targets)]
        seed = int.from_bytes(hashlib.sha256(f"{self.params.seed}:{cell_id}".encode()).digest()[:8], "little")
        drawn = np.random.default_rng(seed).choice(pool, min(self.params.null_genes, pool.size), replace=False)
        return [(int(t), False) for t in targets] + [(int(t), True) for t in drawn]

    def _rows(self, batch, owners, tokens, null, embeddings) -> dict:
        """Every perturbed copy against its cell's original (the copy with token ORIGINAL)."""
        original = {o: i for i, (o, t) in enumerate(zip(owners, tokens)) if t == ORIGINAL}
        base = embeddings[[original[o] for o in owners]] if owners.size else embeddings
        goal_shift = np.full(len(owners), np.nan)
        if self.goal is not None and owners.size:
            goal_shift = cosine(embeddings, self.goal) - cosine(base, self.goal)
            is_original = tokens == ORIGINAL
            goal_shift[is_original] = cosine(embeddings[is_original], self.goal)  # the cell's similarity to the goal
        return {"cell_id": np.asarray(batch["cell_id"], dtype=object)[owners].astype(str), "gene_token": tokens,
                "is_null": null, "shift": (1.0 - cosine(embeddings, base)) if owners.size else np.zeros(0),
                "goal_shift": goal_shift}

    def _write(self, table: dict, cell_ids: list[str]) -> None:
        # named by its cells: a retried batch overwrites its own part instead of adding a duplicate
        name = hashlib.sha256("\n".join(sorted(cell_ids)).encode()).hexdigest()[:20]
        with atomic_file(self.out / "shifts" / f"part-{name}.parquet") as tmp:
            pq.write_table(pa.table({k: np.asarray(v) for k, v in table.items()}), tmp)


def resolve_genes(genes: list[str], vocab) -> tuple[list[str], list[str]]:
    """Ensembl IDs (in the vocabulary) for the given IDs or symbols, and the inputs that are not."""
    found, missing = [], []
    for gene in genes:
        ensembl = vocab.to_ensembl(gene)
        (found if ensembl in vocab.token_ids else missing).append(ensembl if ensembl in vocab.token_ids else gene)
    return list(dict.fromkeys(found)), missing


def perturb(cfg: PerturbConfig) -> dict:
    """Run (or resume) an in-silico perturbation into ``cfg.out``; returns a summary."""
    started = time.perf_counter()
    model_dir, corpus, layer, seed = cfg.model, cfg.corpus, cfg.layer, cfg.seed
    manifest, _, vocab = check_model_and_corpus(model_dir, corpus, layer)
    genes, skipped = list(cfg.genes), []
    if genes:
        genes, skipped = resolve_genes(genes, vocab)
        if not genes:
            raise ValueError(f"--genes: none of {skipped} is a gene of the {vocab.name} vocabulary; pass Ensembl IDs "
                             "or symbols it knows (geneformer-ray vocab ... lists it)")
    start, goal = cfg.states
    for state, flag in ((start, "--start-state"), (goal, "--goal-state")):
        if state:
            check_column_value(manifest, corpus, state[0], state[1], flag)
    params = PerturbParams(model=model_dir, corpus=corpus, perturbation=cfg.perturbation, genes=genes, start_state=start,
                           goal_state=goal, layer=layer, max_cells=cfg.max_cells, null_genes=cfg.null_genes, seed=seed)
    out = Path(cfg.out)
    saved = _open_output(out, params, cfg.overwrite)
    cell_ids = select_cells(corpus, max_cells=cfg.max_cells, where=tuple(start) if start else None, seed=seed)
    if cell_ids is None:
        cell_ids = read_columns(corpus, ["cell_id"]).column(0).to_pylist()
    done = _finished_cells(out)
    todo = [c for c in cell_ids if c not in done]

    plan, num_actors = plan_actor_pool(cfg.accelerator, cfg.num_actors)
    goal_embedding = saved.get("goal_embedding")
    if goal and goal_embedding is None:
        goal_cells = select_cells(corpus, max_cells=cfg.max_state_cells, where=tuple(goal), seed=seed)
        goal_embedding = mean_embedding(model_dir, corpus, goal_cells, layer=layer, plan=plan, num_actors=num_actors)
    write_json(out / "perturb.json", {"params": asdict(params), "goal_embedding": goal_embedding,
                                       "genes_not_in_vocab": skipped})
    if todo:
        _run(model_dir, corpus, out, plan, params, todo, goal_embedding, batch_size=cfg.batch_size,
             cells_per_batch=cfg.cells_per_batch, num_actors=num_actors, progress=cfg.progress)

    metric = "goal_shift" if goal else "shift"
    shifts = read_shifts(out / "shifts")
    stats = gene_statistics(shifts, vocab, metric=metric)
    write_text_atomic(out / "gene_stats.csv", stats.to_csv(index=False))
    plot_significance(stats, out / "shift_vs_significance.png", metric=metric,
                      title=f"{cfg.perturbation}, {Path(model_dir).name}, {len(cell_ids):,} cells")
    cells = int(shifts.loc[shifts["gene_token"] == ORIGINAL, "cell_id"].nunique())
    summary = {"params": asdict(params), "cells": cells, "cells_resumed": len(cell_ids) - len(todo),
               "perturbations": int((~shifts["is_null"] & (shifts["gene_token"] != ORIGINAL)).sum()),
               "genes_tested": int(stats["p_value"].notna().sum()), "genes_fdr_below_0.05": int((stats["fdr"] < 0.05).sum()),
               "genes_not_in_vocab": skipped, "actors": num_actors, "device": plan.kind,
               "seconds": round(time.perf_counter() - started, 1), "out": str(out)}
    if genes:
        summary["genes_not_in_any_cell"] = sorted(set(genes) - set(stats["gene"]))
    write_json(out / "summary.json", summary)
    if cfg.tracking_uri:
        summary["mlflow_run_id"] = log_output_folder(cfg.tracking_uri, cfg.experiment, f"perturb-{cfg.perturbation}",
                                                     asdict(params), out,
                                                     {k: summary[k] for k in ("cells", "perturbations", "genes_tested")})
    return summary


def _run(model_dir, corpus, out: Path, plan, params: PerturbParams, todo: list[str], goal, *, batch_size: int,
         cells_per_batch: int, num_actors: int, progress: bool) -> None:
    """The cells still to do, as blocks of ``cells_per_batch`` (perturbation is compute-bound: small blocks
    keep every actor busy), through the actor pool; one progress bar in cells."""
    cells = read_cells(corpus, todo)
    blocks = [cells.slice(i, cells_per_batch) for i in range(0, cells.num_rows, cells_per_batch)]
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            Perturber, fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "plan": plan.to_dict(),
                                              "params": asdict(params), "out": str(out), "batch_size": batch_size,
                                              "goal": goal},
            batch_size=cells_per_batch, batch_format="numpy", compute=actor_pool(num_actors),
            **actor_resources(plan))
        with tqdm(total=len(todo), desc="perturbed cells", unit="cell", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(np.sum(batch["cells"])))
    finally:
        ctx.enable_progress_bars = bars


def mean_embedding(model_dir, corpus, cell_ids: list[str], *, layer: int, plan, num_actors: int) -> list[float]:
    """The mean cell embedding (gene-token mean at ``layer``) of some cells: a state's centre."""
    ds = read_cells_dataset(corpus, columns=["input_ids", "length", "cell_id"], cell_ids=cell_ids).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "plan": plan.to_dict(),
                                         "layer": layer, "mode": "mean", "batch_size": 32},
        batch_size=256, batch_format="numpy", compute=actor_pool(num_actors), **actor_resources(plan))
    total, count = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        column = batch.column("embedding").combine_chunks()
        values = np.asarray(column.flatten(), np.float64).reshape(len(column), -1)
        total = values.sum(0) if total is None else total + values.sum(0)
        count += len(column)
    return (total / count).tolist()


def _open_output(out: Path, params: PerturbParams, overwrite: bool) -> dict:
    """A new folder, or the same run's folder to resume; anything else is refused (or, with
    ``overwrite``, replaced)."""
    state = out / "perturb.json"
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.exists() and any(out.iterdir()):
        if not state.exists():
            raise ValueError(f"--out {out} is not empty and holds no perturbation run; choose another --out or pass --overwrite")
        saved = json.loads(state.read_text())
        if saved["params"] != asdict(params):
            changed = sorted(k for k in asdict(params) if saved["params"].get(k) != asdict(params)[k])
            raise ValueError(f"--out {out} holds a perturbation run with other parameters ({', '.join(changed)}); "
                             "re-run with the same ones to resume it, or choose another --out (or pass --overwrite)")
        (out / "shifts").mkdir(exist_ok=True)
        for stale in (out / "shifts").glob(".part-*.tmp*"):  # a batch the interrupted run did not finish
            stale.unlink()
        return saved
    (out / "shifts").mkdir(parents=True, exist_ok=True)
    return {}


def _finished_cells(out: Path) -> set[str]:
    done: set[str] = set()
    for part in sorted((out / "shifts").glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["cell_id"]).column(0).to_pylist())
    return done
