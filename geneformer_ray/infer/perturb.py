"""In-silico perturbation: Geneformer's analyses (delete / over-express one gene, a set together, every
gene of each cell, pairs with an anchor; cell, <cls> and cell-and-gene modes; start, goal and alternative
states; cells chosen by metadata or position) plus inhibit / activate, on a pool of model actors.

    geneformer-ray perturb --model runs/quickstart/model --corpus runs/quickstart/corpus --out runs/perturb \
        (--genes ENSG... | SYMBOL... [--group] | --all-genes) [--anchor GENE] \
        --perturbation delete|overexpress|inhibit|activate [--quartiles 1] [--emb-mode cell|cls|cell_and_gene|cls_and_gene] \
        [--start-state cell_type=B --goal-state cell_type="CD14+ Mono" --alt-state cell_type=NK] \
        [--filter cell_type=B,NK] [--cell-range 0:100] [--max-cells 200] [--measure geneformer|cell-shift]

What is measured (``geneformer_ray.infer.perturb_engine``): by default Geneformer's definitions, so that
results compare with published ones. Without states, the mean over the cell's remaining genes of
cos(gene after, same gene before) (``shift`` = 1 - that; <cls> mode: the <cls> state's cosine); with
states, per state the change of the cell embedding's cosine to the state's mean embedding
(``shift_to_goal``, ``shift_to_start``, ``shift_to_alt1`` ...). ``--measure cell-shift`` makes the
statistics use this project's earlier ``cell_shift`` = 1 - cos(mean-pooled after, before) instead.

Null: per cell, ``--null-genes`` random genes of the cell perturbed the same way (random sets of the
group's size with ``--group``; with ``--all-genes`` drawn from the cell's perturbations already computed).
Statistics: ``geneformer_ray.infer.perturb_stats`` (every mode of Geneformer's InSilicoPerturberStats).

The output folder is resumable: each block of cells lands in one ``shifts/part-*.parquet`` (and
``gene_shifts/part-*.parquet`` in cell-and-gene mode, written first), each written to a temporary name,
then renamed; a re-run with the same parameters skips the cells already there. Outputs: ``perturb.json``
(parameters, state embeddings), ``shifts/``, ``gene_shifts/``, ``gene_stats.csv``, ``gene_pair_shifts.parquet``,
the plots, ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from geneformer_ray.console import progress_bar
from geneformer_ray.data.corpus import read_columns
from geneformer_ray.files import clear_output, output_contents, write_json
from geneformer_ray.infer.config import PerturbConfig
from geneformer_ray.infer.embed import Embedder
from geneformer_ray.infer.encoder import (
    check_column_value,
    check_model_and_corpus,
    read_cells,
    read_cells_dataset,
    select_cells,
)
from geneformer_ray.infer.perturb_engine import Perturber
from geneformer_ray.infer.perturb_plan import CLS_MODES, resolve_genes
from geneformer_ray.infer.perturb_stats import finish_statistics, read_shifts
from geneformer_ray.models.packing import packed_copies
from geneformer_ray.runtime import actor_pool, actor_resources, plan_actor_pool
from geneformer_ray.tracking import log_output_folder


@dataclass
class PerturbParams:
    """What defines a perturbation run; a resumed run must have the same."""

    model: str
    corpus: str
    perturbation: str
    genes: list[str] = field(default_factory=list)  # Ensembl IDs; empty = every gene of each cell
    group: bool = False
    anchor: str | None = None  # an Ensembl ID
    quartiles: int = 1
    emb_mode: str = "cell"
    measure: str = "geneformer"
    start_state: list[str] | None = None  # [column, value]
    goal_state: list[str] | None = None
    alt_states: list[list[str]] = field(default_factory=list)
    filters: list[list] = field(default_factory=list)  # [[column, [values]], ...]
    cell_range: list[int] | None = None
    layer: int = -1
    max_cells: int | None = None
    null_genes: int = 5
    seed: int = 0

    @property
    def all_genes(self) -> bool:
        return not self.genes

    @property
    def states(self) -> dict[str, list[str]]:
        """label -> [column, value]: start, goal, alt1, alt2 ... (empty without states)."""
        if self.goal_state is None:
            return {}
        return {"start": self.start_state, "goal": self.goal_state,
                **{f"alt{i}": alt for i, alt in enumerate(self.alt_states, 1)}}

    @property
    def metric(self) -> str:
        """The column the statistics test by default."""
        if self.goal_state is not None:
            return "shift_to_goal"
        return "cell_shift" if self.measure == "cell-shift" else "shift"


def perturb(cfg: PerturbConfig) -> dict:
    """Run (or resume) an in-silico perturbation into ``cfg.out``; returns a summary."""
    started = time.perf_counter()
    model_dir, corpus, layer, seed = cfg.model, cfg.corpus, cfg.layer, cfg.seed
    manifest, _, vocab = check_model_and_corpus(model_dir, corpus, layer)
    if cfg.emb_mode in CLS_MODES and not (vocab.cls_id is not None and manifest.get("adds_cls_eos")):
        raise ValueError(f"--emb-mode {cfg.emb_mode} needs a V2 model and corpus (<cls> first in every cell); {vocab.name} cells have "
                         "no <cls>: use --emb-mode cell (or cell_and_gene)")
    genes = resolve_genes(list(cfg.genes), vocab) if cfg.genes else []
    anchor = resolve_genes([cfg.anchor], vocab, flag="--anchor")[0] if cfg.anchor else None
    start, goal = cfg.states
    for state, flag in ((start, "--start-state"), (goal, "--goal-state"), *((a, "--alt-state") for a in cfg.alternatives)):
        if state:
            check_column_value(manifest, corpus, state[0], state[1], flag)
    for column, values in cfg.cell_filters:
        for value in values:
            check_column_value(manifest, corpus, column, value, "--filter")
    params = PerturbParams(model=model_dir, corpus=corpus, perturbation=cfg.perturbation, genes=genes, group=cfg.group,
                           anchor=anchor, quartiles=cfg.quartiles, emb_mode=cfg.emb_mode, measure=cfg.measure,
                           start_state=start, goal_state=goal, alt_states=cfg.alternatives, filters=cfg.cell_filters,
                           cell_range=cfg.cell_slice, layer=layer, max_cells=cfg.max_cells, null_genes=cfg.null_genes,
                           seed=seed)
    cell_ids = choose_cells(corpus, params)
    cells = read_cells(corpus, cell_ids)
    check_cells(cells, params, vocab)
    out = Path(cfg.out)
    saved = _open_output(out, params, cfg.overwrite)
    done = _finished_cells(out)
    todo = [c for c in cell_ids if c not in done]

    plan, num_actors = plan_actor_pool(cfg.accelerator, cfg.num_actors)
    states = saved.get("state_embeddings")
    if params.states and states is None:
        states = {label: state_embedding(model_dir, corpus, where, layer=layer, mode="cls" if cfg.emb_mode in CLS_MODES else "mean",
                                         max_cells=cfg.max_state_cells, seed=seed, plan=plan, num_actors=num_actors)
                  for label, where in params.states.items()}
    write_json(out / "perturb.json", {"params": asdict(params), "state_embeddings": states})
    packing = packed_copies(cfg.packing, plan.kind, plan.autocast_dtype)
    if todo:
        _run(model_dir, cells.filter(pc.is_in(cells.column("cell_id"), value_set=pa.array(todo, pa.string()))), out, plan, params,
             states, batch_size=cfg.batch_size, cells_per_batch=cfg.cells_per_batch, num_actors=num_actors, progress=cfg.progress,
             packing=packing)

    shifts = read_shifts(out / "shifts")
    title = f"{cfg.perturbation}, {Path(model_dir).name}, {len(cell_ids):,} cells"
    stats_summary = finish_statistics(out, shifts, params, vocab, title=title)
    is_test = ~shifts["role"].isin(["original", "null"])
    summary = {"params": asdict(params), "cells": int((shifts["role"] == "original").sum()),
               "cells_resumed": len(cell_ids) - len(todo), "perturbations": int(is_test.sum()),
               **stats_summary, "actors": num_actors, "device": plan.kind, "packed": packing,
               "seconds": round(time.perf_counter() - started, 1), "out": str(out)}
    if genes:
        tested = set(shifts.loc[is_test, "gene_token"])
        summary["genes_not_in_any_cell"] = sorted(g for g in genes if vocab.token_ids[g] not in tested) if not cfg.group else []
    write_json(out / "summary.json", summary)
    if cfg.tracking_uri:
        summary["mlflow_run_id"] = log_output_folder(cfg.tracking_uri, cfg.experiment, f"perturb-{cfg.perturbation}",
                                                     asdict(params), out,
                                                     {k: summary[k] for k in ("cells", "perturbations", "genes_tested")})
    return summary


def choose_cells(corpus, params: PerturbParams) -> list[str]:
    """The cells to perturb, in corpus order: of the start state, passing every filter, at the positions
    of ``cell_range`` among those, then a seeded sample of ``max_cells``. An empty choice is an error."""
    columns = list(dict.fromkeys(["cell_id", *([params.start_state[0]] if params.start_state else []),
                                  *(f[0] for f in params.filters)]))
    table = read_columns(corpus, columns).to_pandas()
    keep = np.ones(len(table), bool)
    rules = ([[params.start_state[0], [params.start_state[1]]]] if params.start_state else []) + list(params.filters)
    for column, values in rules:
        keep &= table[column].astype(str).isin([str(v) for v in values]).to_numpy()
    ids = table.loc[keep, "cell_id"].astype(str).to_numpy()
    if params.cell_range is not None:
        ids = ids[params.cell_range[0] : params.cell_range[1]]
    if params.max_cells is not None and ids.size > params.max_cells:
        ids = ids[np.sort(np.random.default_rng(params.seed).choice(ids.size, params.max_cells, replace=False))]
    if ids.size == 0:
        chosen = [f"{c}={v}" for c, v in rules] + ([f"--cell-range {params.cell_range}"] if params.cell_range else [])
        raise ValueError(f"no cell of {corpus} is selected by {', '.join(chosen)}; widen the filters or the range")
    return ids.tolist()


def check_cells(cells, params: PerturbParams, vocab) -> None:
    """Checks that need the chosen cells' tokens, before any actor starts: the anchor must be in at least
    one cell, a gene set must leave genes to compare."""
    lengths = np.asarray(cells.column("length"))
    longest = int(lengths.max()) - sum(1 for t in (vocab.cls_id, vocab.eos_id) if t is not None and vocab.adds_cls_eos)
    if params.anchor is not None:
        token = vocab.token_ids[params.anchor]
        if not any(token in set(ids.as_py()) for ids in cells.column("input_ids")):
            raise ValueError(f"--anchor {vocab.gene_symbols.get(params.anchor, params.anchor)} ({params.anchor}) is in none of "
                             f"the {cells.num_rows:,} selected cells; choose an anchor they express, or other cells")
    if params.group:
        size = len(params.genes)
        limit = vocab.max_genes_per_cell if params.perturbation == "overexpress" else longest
        if size >= limit:
            raise ValueError(f"--group of {size} genes is as large as the cells' encodings ({limit} genes at most here): "
                             "nothing would be left to compare; perturb fewer genes together")


def state_embedding(model_dir, corpus, where: list[str], *, layer: int, mode: str, max_cells: int, seed: int, plan,
                    num_actors: int) -> dict:
    """A state's centre: the mean cell embedding (gene-state mean, or <cls>) of up to ``max_cells`` of its
    cells (Geneformer's ``get_state_embs``)."""
    ids = select_cells(corpus, max_cells=max_cells, where=tuple(where), seed=seed, label="--max-state-cells")
    embedding = mean_embedding(model_dir, corpus, ids, layer=layer, plan=plan, num_actors=num_actors, mode=mode)
    return {"column": where[0], "value": where[1], "cells": len(ids), "embedding": embedding}


def _run(model_dir, cells, out: Path, plan, params: PerturbParams, states, *, batch_size: int, cells_per_batch: int,
         num_actors: int, progress: bool, packing: bool) -> None:
    """The cells still to do, as blocks of ``cells_per_batch`` (perturbation is compute-bound: small blocks
    keep every actor busy), through the actor pool; one progress bar in cells."""
    blocks = [cells.slice(i, cells_per_batch) for i in range(0, cells.num_rows, cells_per_batch)]
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            Perturber, fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "plan": plan.to_dict(),
                                              "params": asdict(params), "out": str(out), "batch_size": batch_size,
                                              "states": {k: v["embedding"] for k, v in (states or {}).items()},
                                              "packing": packing},
            batch_size=cells_per_batch, batch_format="numpy", compute=actor_pool(num_actors, one_block_at_a_time=True),
            **actor_resources(plan))
        with progress_bar(total=cells.num_rows, desc="perturbed cells", unit="cell", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(np.sum(batch["cells"])))
    finally:
        ctx.enable_progress_bars = bars


def mean_embedding(model_dir, corpus, cell_ids: list[str], *, layer: int, plan, num_actors: int, mode: str = "mean") -> list[float]:
    """The mean cell embedding (gene-token mean or <cls> at ``layer``) of some cells."""
    ds = read_cells_dataset(corpus, columns=["input_ids", "length", "cell_id"], cell_ids=cell_ids).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "plan": plan.to_dict(),
                                         "layer": layer, "mode": mode, "batch_size": 32},
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
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if overwrite:
        clear_output(out)
    if output_contents(out):
        if not state.exists():
            raise ValueError(f"--out {out} is not empty and holds no perturbation run; choose another --out or pass --overwrite")
        saved = json.loads(state.read_text())
        if saved["params"] != asdict(params):
            changed = sorted(k for k in asdict(params) if saved["params"].get(k) != asdict(params)[k])
            raise ValueError(f"--out {out} holds a perturbation run with other parameters ({', '.join(changed)}); "
                             "re-run with the same ones to resume it, or choose another --out (or pass --overwrite)")
        (out / "shifts").mkdir(exist_ok=True)
        for stale in [*(out / "shifts").glob(".part-*.tmp*"), *(out / "gene_shifts").glob(".part-*.tmp*")]:
            stale.unlink()  # a block the interrupted run did not finish
        return saved
    (out / "shifts").mkdir(parents=True, exist_ok=True)
    return {}


def _finished_cells(out: Path) -> set[str]:
    done: set[str] = set()
    for part in sorted((out / "shifts").glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["cell_id"]).column(0).to_pylist())
    return done
