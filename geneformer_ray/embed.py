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
``obsm["X_geneformer"]``, and the plots of ``geneformer_ray.embed_plots``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from geneformer_ray.accelerators import AcceleratorConfig

MODES = ("mean", "cls", "gene")
OBSM_KEY = "X_geneformer"


def hidden_state_index(layer: int, num_layers: int) -> int:
    """How many encoder layers to run for Geneformer's layer choice (0 = last, -1 = second to last)."""
    if not -num_layers <= layer <= 0:
        raise ValueError(f"--layer {layer} is out of range for a {num_layers}-layer model: use 0 (the last layer), "
                         f"-1 (the second to last, Geneformer's default) down to -{num_layers} (the input embeddings)")
    return num_layers + layer


class CellEncoder:
    """A model folder's BERT encoder cut after one layer, and the pooling of its token states.

    Used inside model actors (embedding, perturbation) and by the benchmarks' single-process peer.
    """

    def __init__(self, model_dir: str | Path, *, layer: int = -1, plan=None):
        import torch
        import transformers
        from transformers import BertModel

        from geneformer_ray.accelerators import actor_device, pad_multiple, plan_accelerator
        from geneformer_ray.models import load_model

        transformers.logging.set_verbosity_error()  # the head weights left unused are expected here
        self.plan = plan or plan_accelerator(AcceleratorConfig(type="cpu"), {}).to_dict()
        model, self.vocab = load_model(model_dir, model_class=BertModel, add_pooling_layer=False)
        self.num_layers = model.config.num_hidden_layers
        model.encoder.layer = model.encoder.layer[: hidden_state_index(layer, self.num_layers)]
        self.device = actor_device(self.plan)
        self.model = model.to(self.device).eval()
        self.special_ids = torch.tensor(sorted(self.vocab.special_token_ids.values()), device=self.device)
        self.pad_multiple = pad_multiple(self.plan)
        self.max_width = model.config.max_position_embeddings
        self.hidden_size = model.config.hidden_size

    def states(self, cells: list[np.ndarray]):
        """Token states (batch, width, hidden) as float32, the gene-token mask (batch, width) and the ids."""
        import torch

        from geneformer_ray.accelerators import autocast
        from geneformer_ray.collate import pad_cells

        input_ids, attention_mask = pad_cells(cells, pad_id=self.vocab.pad_id, multiple=self.pad_multiple,
                                              max_width=self.max_width)
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        with torch.inference_mode(), autocast(self.plan, self.device):  # per call: actors run batches in threads
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        genes = mask.bool() & ~torch.isin(ids, self.special_ids)  # (batch, width)
        return hidden.float(), genes, ids

    def cell_embeddings(self, cells: list[np.ndarray], mode: str = "mean") -> np.ndarray:
        """(batch, hidden) float32: the mean of gene-token states, or the <cls> state."""
        import torch

        hidden, genes, _ = self.states(cells)
        if mode == "cls":
            return hidden[:, 0].cpu().numpy()
        with torch.inference_mode():
            return mean_pool(hidden, genes).cpu().numpy()


def mean_pool(hidden, genes):
    """(batch, hidden): the mean over each row's gene tokens (``genes`` (batch, width) bool)."""
    weights = genes.unsqueeze(-1).to(hidden.dtype)  # (batch, width, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def length_sorted_chunks(lengths, batch_size: int) -> list[np.ndarray]:
    """Row indices, longest first, in chunks of ``batch_size``: cells of similar length pad little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


def read_cells_dataset(corpus, *, columns: list[str] | None = None, cell_ids: list[str] | None = None, rows_per_block: int = 256):
    """A Ray Dataset of the corpus (or of the given cells), in blocks of ``rows_per_block`` so that every
    model actor gets work (a shard is one block otherwise)."""
    from geneformer_ray.corpus import read_corpus

    ds = read_corpus(corpus, columns=columns)
    if cell_ids is not None:
        ds = ds.map_batches(_keep_cells, fn_kwargs={"keep": list(cell_ids)}, batch_format="pyarrow", batch_size=None)
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def _keep_cells(table, keep: list[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("cell_id"), value_set=pa.array(keep, pa.string())))


class Embedder:
    """A model actor for ``Dataset.map_batches``: cell embeddings (with the batch's metadata) or, in
    gene mode, one row per gene token of every cell (summarised per gene afterwards)."""

    def __init__(self, model_dir: str, plan: dict, layer: int, mode: str, batch_size: int):
        self.encoder = CellEncoder(model_dir, layer=layer, plan=plan)
        self.mode, self.batch_size = mode, batch_size

    def __call__(self, batch: dict):
        if self.mode == "gene":
            return self._gene_rows(batch)
        import pyarrow as pa

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


def select_cells(corpus: str | Path, *, max_cells: int | None = None, where: tuple[str, str] | None = None,
                 seed: int = 0, label: str = "--max-cells") -> list[str] | None:
    """Cell ids to use (None: every cell): those whose column ``where[0]`` equals ``where[1]``, then at
    most ``max_cells`` of them (seeded sample, corpus order kept)."""
    from geneformer_ray.corpus import read_columns

    if max_cells is None and where is None:
        return None
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"{label} {max_cells} must be at least 1")
    columns = ["cell_id"] + ([where[0]] if where else [])
    table = read_columns(corpus, columns).to_pandas()
    if where is not None:
        table = table[table[where[0]].astype(str) == str(where[1])]
    ids = table["cell_id"].astype(str).to_numpy()
    if max_cells is not None and ids.size > max_cells:
        ids = ids[np.sort(np.random.default_rng(seed).choice(ids.size, max_cells, replace=False))]
    return ids.tolist()


def check_column_value(manifest: dict, corpus, column: str, value: str | None, flag: str) -> None:
    """A metadata column (and value) the corpus must hold, else a clear error naming what it has."""
    from geneformer_ray.corpus import read_columns

    columns = [c for c in manifest.get("columns", {}) if c not in ("input_ids", "length", "counts")]
    if column not in columns:
        raise ValueError(f"{flag}: the corpus {corpus} has no column {column!r}; it has {columns} "
                         "(tokenize with --obs COLUMN to carry it)")
    if value is not None:
        values = read_columns(corpus, [column]).column(0).to_pandas().astype(str)
        if str(value) not in set(values):
            seen = sorted(values.unique())
            raise ValueError(f"{flag}: no cell of {corpus} has {column}={value!r}; its values are "
                             f"{seen[:20]}{' ...' if len(seen) > 20 else ''}")


def check_model_and_corpus(model_dir, corpus, layer: int):
    """The corpus manifest, model config and vocabulary, once the model folder, the layer and the
    corpus' vocabulary (the model's own) are checked."""
    from transformers import AutoConfig

    from geneformer_ray.corpus import read_manifest
    from geneformer_ray.models import check_corpus_vocab, model_vocab

    if not (Path(model_dir) / "config.json").exists():
        raise ValueError(f"--model {model_dir} is not a model folder (no config.json); pass a folder saved by "
                         "geneformer-ray (…/model) or a Geneformer checkpoint")
    manifest = read_manifest(corpus)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_corpus_vocab(config, manifest, corpus=corpus)
    hidden_state_index(layer, config.num_hidden_layers)
    return manifest, config, model_vocab(config)


def embed(model_dir: str | Path, corpus: str | Path, out: str | Path, *, layer: int = -1, mode: str = "mean",
          batch_size: int = 32, num_actors: int | None = None, accelerator: AcceleratorConfig | None = None,
          max_cells: int | None = None, seed: int = 0, h5ad: bool = False, adata_path: str | Path | None = None,
          color: list[str] | tuple = (), heatmap_by: str | None = None, tracking_uri: str | None = None,
          experiment: str = "geneformer-embed", overwrite: bool = False) -> dict:
    """Embed the cells (or genes) of ``corpus`` with the model in ``model_dir``; returns a summary."""
    import ray

    from geneformer_ray.accelerators import actor_pool, actor_resources, default_num_actors, plan_accelerator
    from geneformer_ray.corpus import discard_output, finalize_output, prepare_output

    started = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: use {', '.join(MODES)}")
    manifest, config, vocab = check_model_and_corpus(model_dir, corpus, layer)
    if mode == "cls" and not (vocab.cls_id is not None and manifest.get("adds_cls_eos")):
        raise ValueError(f"--mode cls needs a V2 model and corpus (<cls> first in every cell); {vocab.name} cells have "
                         "no <cls>: use --mode mean")
    plot_columns = list(dict.fromkeys([*color, *([heatmap_by] if heatmap_by else [])]))
    if mode == "gene" and (plot_columns or h5ad):
        raise ValueError("--color, --heatmap-by and --h5ad are for cell embeddings; drop them with --mode gene")
    for column in plot_columns:
        check_column_value(manifest, corpus, column, None, "--color/--heatmap-by")
    source = _h5ad_source(manifest, corpus, adata_path) if h5ad else None
    cell_ids = select_cells(corpus, max_cells=max_cells, seed=seed)

    if not ray.is_initialized():
        ray.init()
    plan = plan_accelerator(accelerator or AcceleratorConfig(), ray.cluster_resources())
    num_actors = num_actors or default_num_actors(plan, ray.cluster_resources())
    params = {"model": str(Path(model_dir).absolute()), "corpus": str(Path(corpus).absolute()), "layer": layer,
              "mode": mode, "vocab": vocab.name, "num_layers": config.num_hidden_layers, "max_cells": max_cells, "seed": seed}
    tmp = prepare_output(out, overwrite=overwrite)
    try:
        columns = None if mode != "gene" else ["input_ids", "length", "cell_id"]
        ds = read_cells_dataset(corpus, columns=columns, cell_ids=cell_ids, rows_per_block=max(256, batch_size)).map_batches(
            Embedder, fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "plan": plan.to_dict(),
                                             "layer": layer, "mode": mode, "batch_size": batch_size},
            batch_size=max(256, batch_size), batch_format="numpy", compute=actor_pool(num_actors),
            **actor_resources(plan))
        summary = {**params, "actors": num_actors, "device": plan.kind, "hidden_size": config.hidden_size}
        if mode == "gene":
            genes = ds.groupby("gene_token").map_groups(summarise_gene, batch_format="numpy").to_pandas()
            table = _gene_table(genes, vocab)
            table.to_parquet(tmp / "gene_embeddings.parquet", index=False)
            summary.update({"genes": len(table), "cells": None if cell_ids is None else len(cell_ids)})
        else:
            ds.write_parquet(str(tmp / "embeddings"))
            embeddings = read_embeddings(tmp / "embeddings", columns=["cell_id", *plot_columns])
            expected = manifest["num_cells"] if cell_ids is None else len(cell_ids)
            if len(embeddings) != expected:
                raise RuntimeError(f"embedded {len(embeddings):,} cells but expected {expected:,}")
            summary["cells"] = len(embeddings)
            if source is not None:
                summary["h5ad"] = _write_h5ad(source, embeddings, tmp, params, manifest).name
            summary["plots"] = _plots(embeddings, color, heatmap_by, tmp, title=f"{Path(model_dir).name}, layer {layer}, {mode}",
                                      seed=seed)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        discard_output(tmp)
        raise
    final = finalize_output(tmp, out)
    summary.update(out=str(final), plots=[str(final / p) for p in summary.get("plots", [])])
    if "h5ad" in summary:
        summary["h5ad"] = str(final / summary["h5ad"])
    if tracking_uri:
        summary["mlflow_run_id"] = log_outputs(tracking_uri, experiment, f"embed-{mode}", params, Path(summary["out"]),
                                               {"cells": summary.get("cells") or 0, "seconds": summary["seconds"]})
    return summary


def read_embeddings(folder: str | Path, columns: list[str] | None = None):
    """An embedding folder's cells as a DataFrame (``columns`` plus ``embedding`` as a (cells, hidden) array
    in ``.attrs["embedding"]``), in cell-id order so that runs compare row by row."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder), columns=None if columns is None else list(dict.fromkeys([*columns, "embedding"])))
    frame = table.drop(["embedding"]).to_pandas()
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(frame), -1)
    order = np.argsort(frame["cell_id"].to_numpy(dtype=str), kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs["embedding"] = matrix[order]
    return frame


def _gene_table(genes, vocab):
    import pandas as pd

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
    import anndata

    adata = anndata.read_h5ad(source)
    matched = add_embeddings(adata, embeddings, cell_id_column=manifest.get("settings", {}).get("cell_id_column"),
                             params={**params, "source": str(source)})
    adata.uns["geneformer"]["cells_embedded"] = matched
    path = tmp / f"{source.stem}_geneformer.h5ad"
    adata.write_h5ad(path)
    return path


def _plots(embeddings, color, heatmap_by, folder: Path, *, title: str, seed: int) -> list[str]:
    from geneformer_ray.embed_plots import plot_heatmap, plot_umap

    paths = [plot_umap(embeddings.attrs["embedding"], embeddings[c], folder / f"umap_{c}.png", title=title, seed=seed)
             for c in color]
    if heatmap_by:
        paths.append(plot_heatmap(embeddings.attrs["embedding"], embeddings[heatmap_by], folder / f"heatmap_{heatmap_by}.png",
                                  title=title, seed=seed))
    return [p.name for p in paths]


def log_outputs(uri: str, experiment: str, run_name: str, params: dict, folder: Path, metrics: dict) -> str:
    """One MLflow run with the parameters, headline metrics, the plots and the summary / statistics files."""
    from geneformer_ray.tracking import start_tracking

    tracker = start_tracking(uri, experiment=experiment, run_name=run_name, rank=0, params=params)
    tracker.log_metrics(metrics, step=0)
    for path in sorted(folder.iterdir()):
        if path.suffix in (".png", ".json", ".csv"):
            tracker.log_artifact(path)
    tracker.finish()
    return tracker.run_id
