"""The distributed tokenize job: count files -> one Ray task per (file, range of cells) -> corpus folder.

    geneformer-ray tokenize data/*.h5ad --vocab gc104M --out corpus/ --obs cell_type --obs disease=state

The driver checks every input first (file opens, genes map, columns exist), then tasks read their
cell range straight from the file, encode it and write one parquet shard into a temporary folder
that becomes the corpus only when every task succeeded. Multi-node: ``out`` must be on storage that
every node sees (NFS); each task reads its input from the same path.
"""

from __future__ import annotations

import glob
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata
import numpy as np
import pyarrow.parquet as pq
import ray

from geneformer_ray.console import progress_bar
from geneformer_ray.data.corpus import PARQUET_COMPRESSION, ROW_GROUP_CELLS, with_split, write_manifest
from geneformer_ray.data.encode import (
    GenePlan,
    TokenizeOptions,
    count_problems,
    encode_cells,
    format_problems,
    plan_genes,
)
from geneformer_ray.data.readers import SUPPORTED_SUFFIXES, open_counts
from geneformer_ray.data.vocab import Vocabulary, load_vocab
from geneformer_ray.files import discard_output, finalize_output, prepare_output, sha256_file
from geneformer_ray.runtime import start_ray


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, folders (their .h5ad/.loom files) and glob patterns -> sorted unique file list."""
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"input pattern {item!r} matches no file")
            files += [p for p in matches if p.is_file()]
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise ValueError(f"input folder {item} holds no .h5ad or .loom file")
            files += found
        else:
            files.append(Path(item))
    unique = list(dict.fromkeys(p.absolute() for p in files))
    if not unique:
        raise ValueError("no input files given; pass .h5ad/.loom files, folders or globs")
    return unique


def plan_file(path: Path, vocab: Vocabulary, options: TokenizeOptions) -> dict:
    """Open one input, check it, and map its genes: every error here comes before any task runs."""
    with open_counts(path, layer=options.layer) as f:
        if f.n_cells == 0 or f.n_genes == 0:
            raise ValueError(f"{path}: the count matrix is empty ({f.n_cells:,} cells x {f.n_genes:,} genes); remove it from the inputs")
        obs = f.obs_columns()
        obs_columns = options.resolve_obs_columns(obs, str(path))
        id_column = options.gene_id_column
        if id_column is None and "ensembl_id" in f.var_columns():
            id_column = "ensembl_id"
        var_ids = f.read_var(id_column)
        where = f"var[{id_column!r}]" if id_column else "var index"
        plan = plan_genes(var_ids, vocab, sum_duplicates=options.sum_duplicates,
                          min_mapped_fraction=options.min_mapped_fraction, source=str(path), id_column=where,
                          max_genes=options.max_genes)
        warnings = []
        if getattr(f, "encoding", None) == "csc_matrix":
            warnings.append("count matrix is CSC: every chunk reads the whole matrix; save it as CSR for speed")
        return {
            "path": path, "n_cells": f.n_cells, "obs_columns": obs_columns, "n_genes": f.n_genes, "gene_plan": plan, "var_ids": var_ids,
            "n_counts_from_obs": options.count_column in obs,
            "filter_from_obs": options.filter_column in obs,
            "warnings": warnings,
        }


def tokenize_range(path: Path, start: int, stop: int, gene_plan: GenePlan, var_ids: np.ndarray, options: dict,
                   obs_columns: dict[str, str], shard_path: Path, n_counts_from_obs: bool, filter_from_obs: bool) -> dict:
    """Encode cells [start, stop) of one file into ``shard_path``; returns the chunk's statistics."""
    options = TokenizeOptions.from_dict(options)
    with open_counts(path, layer=options.layer) as f:
        counts = f.read_counts(start, stop)
        cell_ids = f.read_obs(options.cell_id_column, start, stop)
        problems = count_problems(counts, allow_non_integer=options.allow_non_integer)
        if set(problems) - {"first"}:
            return {"problems": problems, "message": format_problems(problems, cell_ids, var_ids)}
        n_counts = f.read_obs(options.count_column, start, stop) if n_counts_from_obs else None
        keep = f.read_obs(options.filter_column, start, stop) if filter_from_obs else None
        metadata = {dst: f.read_obs(src, start, stop) for src, dst in obs_columns.items()}
    if n_counts is not None:
        n_counts = np.asarray(n_counts, dtype=np.float64)
    if keep is not None:
        keep = np.asarray(keep == 1, dtype=bool)
    table, stats = encode_cells(counts, n_counts=n_counts, keep=keep, cell_ids=cell_ids, metadata=metadata,
                                plan=gene_plan, keep_counts=options.keep_counts)
    table = with_split(table, options.val_fraction)
    pq.write_table(table, shard_path, compression=PARQUET_COMPRESSION, row_group_size=ROW_GROUP_CELLS)
    cut_at = gene_plan.max_genes + (2 if gene_plan.cls_id >= 0 else 0)  # the input size, or options.max_genes
    stats["cells_at_input_size"] = int((table["length"].to_numpy() >= cut_at).sum())
    return stats


def tokenize(inputs, out: str | Path, *, vocab: str | Vocabulary = "gc30M", options: TokenizeOptions | None = None,
             cells_per_shard: int = 10_000, executor: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize count files (and in-memory AnnData objects) into a corpus folder; returns its manifest
    (``summary`` inside).

    ``inputs``: .h5ad/.loom files, folders, glob patterns, or ``anndata.AnnData`` objects; an AnnData is
    kept in the corpus as ``sources/anndata-N.h5ad`` (the counts the baseline and ``embed --h5ad`` read).
    ``executor='ray'`` runs one Ray task per shard (connecting to, or starting, a Ray instance);
    ``'local'`` runs them one after another in this process; ``'auto'`` runs a single shard locally (a
    few thousand cells take about a second, less than starting Ray and a worker) and more on Ray.
    """
    if executor not in ("auto", "ray", "local"):
        raise ValueError(f"executor={executor!r}: use 'auto', 'ray' or 'local'")
    if cells_per_shard < 1:
        raise ValueError(f"cells_per_shard={cells_per_shard} must be at least 1")
    options = options or TokenizeOptions()
    vocab = load_vocab(vocab)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike, anndata.AnnData)) else list(inputs)
    inputs = [item if isinstance(item, anndata.AnnData) else os.fspath(item) for item in inputs]  # Corpus results too
    in_memory = [item for item in inputs if isinstance(item, anndata.AnnData)]
    files = expand_inputs([item for item in inputs if not isinstance(item, anndata.AnnData)]) if len(in_memory) < len(inputs) else []
    started = time.perf_counter()
    tmp = prepare_output(out, overwrite=overwrite)
    final = Path(out).absolute()
    try:
        for i, adata in enumerate(in_memory):
            files.append(tmp / "sources" / f"anndata-{i}.h5ad")
            files[-1].parent.mkdir(exist_ok=True)
            adata.write_h5ad(files[-1])
        plans = [plan_file(p, vocab, options) for p in files]
        jobs = [
            dict(path=plan["path"], start=s, stop=min(plan["n_cells"], s + cells_per_shard), gene_plan=plan["gene_plan"],
                 var_ids=plan["var_ids"], options=options.to_dict(), obs_columns=plan["obs_columns"],
                 shard_path=tmp / f"f{i:05d}-c{s:012d}.parquet", n_counts_from_obs=plan["n_counts_from_obs"],
                 filter_from_obs=plan["filter_from_obs"])
            for i, plan in enumerate(plans) for s in range(0, plan["n_cells"], cells_per_shard)
        ]
        if executor == "auto":
            executor = "local" if len(jobs) <= 1 else "ray"
        results, hashes = _run(jobs, files, executor, progress)
        sources = _sources(plans, jobs, results, hashes, recorded=lambda path: final / path.relative_to(tmp)
                           if path.is_relative_to(tmp) else path)
        _raise_on_problems(sources)
        summary = _summarize(sources, vocab, time.perf_counter() - started)
        if summary["cells_out"] == 0:
            raise ValueError(
                f"every cell was dropped ({summary['cells_filtered']:,} by {options.filter_column!r} != 1, "
                f"{summary['cells_no_vocab_gene']:,} with no {vocab.name} gene); check the filter column and the gene IDs"
            )
        manifest = write_manifest(tmp, vocab=vocab, shard_files=[j["shard_path"] for j in jobs if j["shard_path"].exists()],
                                            sources=sources, summary=summary, settings={"cells_per_shard": cells_per_shard, **options.to_dict()},
                                  val_fraction=options.val_fraction)
        (tmp / "summary.txt").write_text(format_summary(manifest) + "\n")
    except BaseException:
        discard_output(tmp)
        raise
    finalize_output(tmp, out)
    return manifest


def _run(jobs: list[dict], files: list[Path], executor: str, progress: bool) -> tuple[list[dict], list[str]]:
    """Run the shard jobs (and hash the inputs alongside); returns (per-job stats, per-file sha256)."""
    bar = progress_bar(total=sum(j["stop"] - j["start"] for j in jobs), unit="cells", desc="tokenize", disable=not progress)
    if executor == "local":
        results = []
        for job in jobs:
            results.append(tokenize_range(**job))
            bar.update(job["stop"] - job["start"])
        bar.close()
        return results, [sha256_file(p) for p in files]
    started_ray = not ray.is_initialized()
    start_ray()
    hasher = ThreadPoolExecutor(max_workers=1)  # the driver mostly waits: hash the inputs meanwhile
    try:
        hashes = [hasher.submit(sha256_file, p) for p in files]
        task = ray.remote(num_cpus=1, max_retries=2)(tokenize_range)
        shared = {}  # each large argument goes into the object store once, not once per task
        for job in jobs:
            for key in ("gene_plan", "var_ids"):
                if id(job[key]) not in shared:
                    shared[id(job[key])] = (job[key], ray.put(job[key]))
                job[key] = shared[id(job[key])][1]
        refs = {task.remote(**job): i for i, job in enumerate(jobs)}
        results: list[dict | None] = [None] * len(jobs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                try:
                    results[i] = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
                bar.update(jobs[i]["stop"] - jobs[i]["start"])
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
        finally:
            bar.close()
        return results, [h.result() for h in hashes]
    finally:
        hasher.shutdown(cancel_futures=True)
        if started_ray:
            ray.shutdown()


def _sources(plans, jobs, results, hashes, recorded) -> list[dict]:
    """Per input: where it lies once the corpus is in place (``recorded``), its hash, genes and cell counts."""
    sources = []
    for plan, digest in zip(plans, hashes):
        mine = [r for j, r in zip(jobs, results) if j["path"] == plan["path"]]
        source = {"path": str(recorded(plan["path"])), "sha256": digest, "cells": plan["n_cells"], "genes": plan["gene_plan"].stats,
                  "n_counts": "obs" if plan["n_counts_from_obs"] else "computed from the matrix", "warnings": plan["warnings"]}
        problems = [r for r in mine if "problems" in r]
        if problems:
            source["problems"] = problems
        else:
            for key in ("cells_in", "cells_filtered", "cells_no_vocab_gene", "cells_out", "tokens", "cells_at_input_size"):
                source[key] = sum(r[key] for r in mine)
        sources.append(source)
    return sources


def _raise_on_problems(sources: list[dict]) -> None:
    lines = []
    for source in sources:
        for chunk in source.get("problems", []):
            lines.append(f"{source['path']}: {chunk['message']}")
    if lines:
        total = {}
        for source in sources:
            for chunk in source.get("problems", []):
                for kind, n in chunk["problems"].items():
                    if kind != "first":
                        total[kind] = total.get(kind, 0) + n
        counts = ", ".join(f"{n:,} {kind}" for kind, n in total.items())
        raise ValueError(f"input is not raw counts ({counts} values in all); nothing was written:\n  " + "\n  ".join(lines[:10]))


def _summarize(sources: list[dict], vocab: Vocabulary, seconds: float) -> dict:
    keys = ("cells_in", "cells_filtered", "cells_no_vocab_gene", "cells_out", "tokens", "cells_at_input_size")
    summary = {k: sum(s[k] for s in sources) for k in keys}
    summary.update({"files": len(sources), "vocab": vocab.name, "seconds": round(seconds, 3),
                    "cells_per_second": round(summary["cells_in"] / seconds, 1) if seconds > 0 else None})
    return summary


def format_summary(manifest: dict) -> str:
    """A human-readable account of a tokenize run (printed, and saved as summary.txt)."""
    s = manifest["summary"]
    hist = manifest["length_histogram"]
    lines = [
        f"tokenized {s['cells_out']:,} of {s['cells_in']:,} cells from {s['files']} file(s) into {len(manifest['shards'])} shard(s) "
        f"with {manifest['vocab']['name']} (input size {manifest['model_input_size']:,}) in {s['seconds']:.1f} s",
        f"  dropped: {s['cells_filtered']:,} by filter column, {s['cells_no_vocab_gene']:,} with no vocabulary gene; "
        f"{s['cells_at_input_size']:,} truncated at "
        + (f"their top {max_genes:,} genes (max_genes)" if (max_genes := manifest.get("settings", {}).get("max_genes"))
           else "the input size"),
    ]
    for src in manifest["sources"]:
        g = src["genes"]
        lines.append(f"  {Path(src['path']).name}: {src['cells_out']:,}/{src['cells_in']:,} cells; genes from {g['id_column']}: "
                     f"{g['genes_total']:,} total, {g['genes_in_vocab']:,} in vocabulary, {g['genes_not_in_vocab']:,} not in vocabulary, "
                     f"{g['genes_unmapped']:,} unmapped, {g['duplicate_columns_summed']:,} duplicate-ID columns summed; "
                     f"n_counts {src['n_counts']}")
        lines += [f"  warning: {w}" for w in src["warnings"]]
    counts = np.array(hist["counts"])
    if counts.sum():
        counts = counts[: np.flatnonzero(counts).max() + 1]  # up to the longest cell (a --max-genes cut ends early)
        group = max(1, len(counts) // 8)
        width = hist["bin_width"] * group
        grouped = np.add.reduceat(counts, np.arange(0, len(counts), group))
        lines.append("  cell length (tokens):")
        for i, c in enumerate(grouped):
            bar = "#" * int(round(40 * c / grouped.max()))
            lines.append(f"    {i * width + 1:>5}-{(i + 1) * width:<5} {c:>9,} {bar}")
    return "\n".join(lines)
