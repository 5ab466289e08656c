"""Cell and gene embeddings on a pool of model actors (Ray Data ``map_batches``).

    geneformer-ray embed --model runs/quickstart/model --corpus runs/quickstart/corpus --out runs/embed \
        [--layer -1] [--mode mean|cls|gene] [--h5ad] [--color cell_type]

Any model folder works (pretrained, fine-tuned cell/gene/multitask, or a published Geneformer
checkpoint): only its BERT encoder is used, cut after the chosen layer. Layers count like Geneformer's
``emb_layer``: 0 = the last layer, -1 = the second to last (Geneformer's default), down to
-num_layers = the input embeddings. Modes:
  mean  the mean of the cell's gene-token states (no <pad>, <cls>, <eos>)
  cls   the <cls> token's state (V2 models, gc104M vocabulary)
  gene  one embedding per gene: the mean and the median of its token states over the cells it occurs in
Each actor (one per NPU / GPU, or CPU actors) sorts its batch by length and pads per sub-batch.
The output folder appears complete or not at all: ``embeddings/*.parquet`` (cell_id, the corpus'
metadata columns, ``embedding`` list<float32>) or ``gene_embeddings.parquet`` (gene, symbol, token,
cells, mean, median), ``summary.json``, optionally an ``.h5ad`` copy of the tokenized file with
``obsm["X_geneformer"]``, and the plots of ``geneformer_ray.infer.plots``.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geneformer_ray.files import discard_output, finalize_output, prepare_output, write_json
from geneformer_ray.infer.config import EmbedConfig
from geneformer_ray.infer.encoder import (
    CellEncoder,
    check_column_value,
    check_model_and_corpus,
    length_sorted_chunks,
    read_cells_dataset,
    select_cells,
)
from geneformer_ray.infer.plots import plot_heatmap, plot_umap
from geneformer_ray.models.packing import packing_enabled
from geneformer_ray.runtime import actor_pool, actor_resources, plan_actor_pool, tallied
from geneformer_ray.tracking import log_output_folder

OBSM_KEY = "X_geneformer"


class Embedder:
    """A model actor for ``Dataset.map_batches``: cell embeddings (with the batch's metadata) or, in
    gene mode, one row per gene token of every cell (summarised per gene afterwards)."""

    def __init__(self, model_dir: str, plan: dict, layer: int, mode: str, batch_size: int, tally=None,
                 packing: bool = False):
        self.encoder = CellEncoder(model_dir, layer=layer, plan=plan, packing=packing and mode != "gene")
        self.mode, self.batch_size, self.tally = mode, batch_size, tally

    def __call__(self, batch: dict):
        rows = self._gene_rows(batch) if self.mode == "gene" else self._cell_rows(batch)
        if self.tally is not None:
            self.tally.add.remote(len(batch["cell_id"]))
        return rows

    def _cell_rows(self, batch: dict):
        embeddings = np.zeros((len(batch["cell_id"]), self.encoder.hidden_size), np.float32)
        for chunk in length_sorted_chunks(batch["length"], self.batch_size):
            embeddings[chunk] = self.encoder.cell_embeddings([batch["input_ids"][i] for i in chunk], self.mode)
        columns = {k: pa.array(np.asarray(v).tolist()) for k, v in batch.items() if k not in ("input_ids", "counts")}
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), self.encoder.hidden_size)
        return pa.table(columns)

    def _gene_rows(self, batch: dict) -> dict:
        tokens, states = [], []
        for chunk in length_sorted_chunks(batch["length"], self.batch_size):
            hidden, genes, ids = self.encoder.states([batch["input_ids"][i] for i in chunk])
            tokens.append(ids[genes].cpu().numpy().astype(np.int32))
            states.append(hidden[genes].cpu().numpy())  # (gene tokens, hidden)
        return {"gene_token": np.concatenate(tokens), "embedding": np.concatenate(states)}


def summarise_gene(group: dict) -> dict:
    """One gene's token states over all cells -> cells, mean, median (``map_groups``)."""
    states = np.asarray(group["embedding"], dtype=np.float32)  # (cells, hidden)
    return {"gene_token": group["gene_token"][:1].astype(np.int64), "cells": np.array([len(states)], np.int64),
            "mean": states.mean(0, keepdims=True), "median": np.median(states, 0, keepdims=True)}


def embed(cfg: EmbedConfig) -> dict:
    """Embed the cells (or genes) of the corpus with the model; returns a summary."""
    started = time.perf_counter()
    model_dir, corpus, mode, layer = cfg.model, cfg.corpus, cfg.mode, cfg.layer
    manifest, config, vocab = check_model_and_corpus(model_dir, corpus, layer)
    if mode == "cls" and not (vocab.cls_id is not None and manifest.get("adds_cls_eos")):
        raise ValueError(f"--mode cls needs a V2 model and corpus (<cls> first in every cell); {vocab.name} cells have "
                         "no <cls>: use --mode mean")
    for column in cfg.plot_columns:
        check_column_value(manifest, corpus, column, None, "--color/--heatmap-by")
    source = _h5ad_source(manifest, corpus, cfg.adata_path) if cfg.h5ad or cfg.adata_path else None
    cell_ids = select_cells(corpus, max_cells=cfg.max_cells, seed=cfg.seed)

    plan, num_actors = plan_actor_pool(cfg.accelerator, cfg.num_actors)
    packing = packing_enabled(cfg.packing) and mode != "gene"  # gene mode reads every token's state: padded batches
    params = {"model": model_dir, "corpus": corpus, "layer": layer, "mode": mode, "vocab": vocab.name, "packing": packing,
              "num_layers": config.num_hidden_layers, "max_cells": cfg.max_cells, "seed": cfg.seed}
    tmp = prepare_output(cfg.out, overwrite=cfg.overwrite)
    expected = manifest["num_cells"] if cell_ids is None else len(cell_ids)
    try:
        columns = None if mode != "gene" else ["input_ids", "length", "cell_id"]
        rows = max(256, cfg.batch_size)
        with tallied(total=expected, desc="embed") as tally:
            ds = read_cells_dataset(corpus, columns=columns, cell_ids=cell_ids, rows_per_block=rows).map_batches(
                Embedder, fn_constructor_kwargs={"model_dir": model_dir, "plan": plan.to_dict(), "layer": layer,
                                                 "mode": mode, "batch_size": cfg.batch_size, "tally": tally,
                                                 "packing": packing},
                batch_size=rows, batch_format="numpy", compute=actor_pool(num_actors), **actor_resources(plan))
            if mode == "gene":
                genes = ds.groupby("gene_token").map_groups(summarise_gene, batch_format="numpy").to_pandas()
            else:
                ds.write_parquet(str(tmp / "embeddings"))
        summary = {**params, "actors": num_actors, "device": plan.kind, "hidden_size": config.hidden_size}
        if mode == "gene":
            table = _gene_table(genes, vocab)
            table.to_parquet(tmp / "gene_embeddings.parquet", index=False)
            summary.update({"genes": len(table), "cells": None if cell_ids is None else len(cell_ids)})
        else:
            embeddings = read_embeddings(tmp / "embeddings", columns=["cell_id", *cfg.plot_columns])
            if len(embeddings) != expected:
                raise RuntimeError(f"embedded {len(embeddings):,} cells but expected {expected:,}")
            summary["cells"] = len(embeddings)
            if source is not None:
                summary["h5ad"] = _write_h5ad(source, embeddings, tmp, params, manifest).name
            summary["plots"] = _plots(embeddings, cfg.color, cfg.heatmap_by, tmp, seed=cfg.seed,
                                      title=f"{Path(model_dir).name}, layer {layer}, {mode}")
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_json(tmp / "summary.json", summary)
    except BaseException:
        discard_output(tmp)
        raise
    final = finalize_output(tmp, cfg.out)
    summary.update(out=str(final), plots=[str(final / p) for p in summary.get("plots", [])])
    if "h5ad" in summary:
        summary["h5ad"] = str(final / summary["h5ad"])
    if cfg.tracking_uri:
        summary["mlflow_run_id"] = log_output_folder(cfg.tracking_uri, cfg.experiment, f"embed-{mode}", params, final,
                                                     {"cells": summary.get("cells") or 0, "seconds": summary["seconds"]})
    return summary


def read_embeddings(folder: str | Path, columns: list[str] | None = None):
    """An embedding folder's cells as a DataFrame (``columns`` plus ``embedding`` as a (cells, hidden) array
    in ``.attrs["embedding"]``), in cell-id order so that runs compare row by row."""
    table = pq.read_table(str(folder), columns=None if columns is None else list(dict.fromkeys([*columns, "embedding"])))
    frame = table.drop(["embedding"]).to_pandas()
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(frame), -1)
    order = np.argsort(frame["cell_id"].to_numpy(dtype=str), kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs["embedding"] = matrix[order]
    return frame


def _gene_table(genes, vocab):
    by_token = {t: g for g, t in vocab.token_ids.items()}
    ensembl = [by_token[int(t)] for t in genes["gene_token"]]
    table = pd.DataFrame({"gene": ensembl, "symbol": [vocab.gene_symbols.get(g, "") for g in ensembl],
                          "gene_token": genes["gene_token"].astype(np.int64), "cells": genes["cells"].astype(np.int64),
                          "mean": [np.asarray(v, np.float32) for v in genes["mean"]],
                          "median": [np.asarray(v, np.float32) for v in genes["median"]]})
    return table.sort_values(["cells", "gene"], ascending=[False, True], ignore_index=True)


def _h5ad_source(manifest: dict, corpus, adata_path) -> Path:
    """The AnnData file to copy: the one given, else the corpus' single .h5ad source."""
    if adata_path is not None:
        path = Path(adata_path)
    else:
        sources = [Path(s["path"]) for s in manifest.get("sources", [])]
        if len(sources) != 1 or sources[0].suffix != ".h5ad":
            raise ValueError(f"--h5ad: the corpus {corpus} was tokenized from {[str(s) for s in sources]}, not one .h5ad "
                             "file; pass --adata FILE.h5ad (the file whose cells to annotate)")
        path = sources[0]
    if not path.exists():
        raise ValueError(f"--h5ad: {path} does not exist; pass --adata FILE.h5ad (the file the corpus was tokenized from)")
    return path


def add_embeddings(adata, embeddings, *, cell_id_column: str | None = None, key: str = OBSM_KEY,
                   params: dict | None = None) -> int:
    """Put cell embeddings into ``adata.obsm[key]`` in ``adata``'s cell order (NaN rows for cells the
    corpus does not hold: filtered or without a vocabulary gene) and the parameters into
    ``adata.uns["geneformer"]["params"]``. Returns the number of cells matched."""
    names = adata.obs[cell_id_column].astype(str) if cell_id_column else adata.obs_names.astype(str)
    position = {name: i for i, name in enumerate(names)}
    rows = np.array([position.get(c, -1) for c in embeddings["cell_id"].astype(str)])
    found = rows >= 0
    if not found.any():
        raise ValueError(f"no embedded cell id matches the AnnData's {'obs[' + repr(cell_id_column) + ']' if cell_id_column else 'obs names'} "
                         f"(first ids: {list(embeddings['cell_id'][:3])} vs {list(names[:3])}); pass the file the corpus was tokenized from")
    matrix = embeddings.attrs["embedding"]
    full = np.full((adata.n_obs, matrix.shape[1]), np.nan, np.float32)
    full[rows[found]] = matrix[found]
    adata.obsm[key] = full
    adata.uns["geneformer"] = {"params": {k: ("" if v is None else v) for k, v in (params or {}).items()}}
    return int(found.sum())


def _write_h5ad(source: Path, embeddings, tmp: Path, params: dict, manifest: dict) -> Path:
    adata = anndata.read_h5ad(source)
    matched = add_embeddings(adata, embeddings, cell_id_column=manifest.get("settings", {}).get("cell_id_column"),
                             params={**params, "source": str(source)})
    adata.uns["geneformer"]["cells_embedded"] = matched
    path = tmp / f"{source.stem}_geneformer.h5ad"
    adata.write_h5ad(path)
    return path


def _plots(embeddings, color, heatmap_by, folder: Path, *, title: str, seed: int) -> list[str]:
    paths = [plot_umap(embeddings.attrs["embedding"], embeddings[c], folder / f"umap_{c}.png", title=title, seed=seed)
             for c in color]
    if heatmap_by:
        paths.append(plot_heatmap(embeddings.attrs["embedding"], embeddings[heatmap_by], folder / f"heatmap_{heatmap_by}.png",
                                  title=title, seed=seed))
    return [p.name for p in paths]
