"""Tokenizer throughput and memory, against a Geneformer-style implementation in the same run.

    python benchmarks/tokenize_bench.py [--cells 10000 100000] [--workdir /tmp/gf-bench]

Builds .h5ad files of N cells by resampling the bundled real PBMC3k cells with binomial thinning
(p ~ U(0.6, 1.0) per cell, so no two cells are equal), then measures, each in a fresh process:
  (a) this tokenizer in one process (executor='local'), V1 (gc30M) and V2 (gc104M);
  (b) the Ray job with 2 workers on a running 2-CPU Ray instance (its start-up not timed): the first
      job on fresh worker processes ("cold": imports and kernel loading included), then the same job
      again ("warm", the figure compared);
  (c) a straightforward implementation the way Geneformer's tokenizer works: whole file in memory,
      normalise, one argsort per cell in a Python loop, token lists gathered in Python, then written.
Prints one JSON line: cells/s and peak RSS per case, the ratios the targets are about, versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_dataset(n_cells: int, path: Path, seed: int = 0) -> Path:
    """N cells resampled from PBMC3k with per-cell binomial thinning."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from geneformer_ray.cli import DEMO_DATA

    if path.exists():
        return path
    src = ad.read_h5ad(DEMO_DATA / "pbmc3k_counts.h5ad")
    X = sp.csr_matrix(src.X)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, X.shape[0], n_cells)
    starts, stops = X.indptr[pick], X.indptr[pick + 1]
    take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
    p = np.repeat(rng.uniform(0.6, 1.0, n_cells), stops - starts)
    data = rng.binomial(X.data[take].astype(np.int64), p).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(stops - starts)])
    thinned = sp.csr_matrix((data, X.indices[take], indptr), shape=(n_cells, X.shape[1]))
    thinned.eliminate_zeros()
    obs = pd.DataFrame({"cell_type": src.obs["cell_type"].to_numpy()[pick],
                        "n_counts": np.asarray(thinned.sum(axis=1)).ravel()},
                       index=[f"cell{i}" for i in range(n_cells)])
    obs["cell_type"] = obs["cell_type"].astype("category")
    tmp = path.with_suffix(".tmp.h5ad")
    ad.AnnData(X=thinned, obs=obs, var=src.var.copy()).write_h5ad(tmp)
    tmp.replace(path)
    return path


# -- (c): the way Geneformer's tokenizer works ----------------------------------------------------
def geneformer_style(path: Path, vocab_name: str, out: Path) -> int:
    import anndata as ad
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from geneformer_ray.data.vocab import load_vocab

    vocab = load_vocab(vocab_name)
    adata = ad.read_h5ad(path)  # whole file in memory
    ens = [vocab.to_ensembl(x) for x in adata.var["ensembl_id"].astype(str)]
    X = sp.csr_matrix(adata.X)
    if vocab.adds_cls_eos:  # V2 sums duplicate IDs: collapse columns with an aggregation matrix
        genes = sorted({g for g in ens if g in vocab.token_ids})
        col = {g: i for i, g in enumerate(genes)}
        rows = [j for j, g in enumerate(ens) if g in col]
        agg = sp.csr_matrix((np.ones(len(rows)), (rows, [col[ens[j]] for j in rows])), shape=(len(ens), len(genes)))
        X_view, loc_genes = (X @ agg).tocsr(), genes
    else:  # V1: vocabulary columns as they are
        loc = [j for j, g in enumerate(ens) if g in vocab.token_ids]
        X_view, loc_genes = X[:, loc], [ens[j] for j in loc]
    norm = np.array([vocab.gene_medians[g] for g in loc_genes])
    tokens = np.array([vocab.token_ids[g] for g in loc_genes])
    n_counts = adata.obs["n_counts"].to_numpy()[:, None]
    X_norm = sp.csr_matrix(X_view / n_counts * 10_000 / norm)
    cells = []
    for i in range(X_norm.shape[0]):
        row = X_norm[i]
        ranked = tokens[row.indices][np.argsort(-row.data)][: vocab.max_genes_per_cell]
        cells.append(([vocab.cls_id] + ranked.tolist() + [vocab.eos_id]) if vocab.adds_cls_eos else ranked.tolist())
    table = pa.table({"input_ids": pa.array(cells, pa.list_(pa.int32())), "length": [len(c) for c in cells],
                      "cell_type": adata.obs["cell_type"].astype(str).tolist()})
    pq.write_table(table, out / "part-00000.parquet")
    return len(cells)


def run_case(mode: str, path: str, vocab: str, workers: int) -> dict:
    """Runs in a fresh process: times one case, reports cells/s and this process's peak RSS."""
    from geneformer_ray.data.encode import TokenizeOptions
    from geneformer_ray.data.tokenize import tokenize

    out = Path(tempfile.mkdtemp(prefix="gf-bench-")) / "corpus"
    if mode == "geneformer_style":
        out.mkdir(parents=True)
        started = time.perf_counter()
        cells = geneformer_style(Path(path), vocab, out)
        return _timed(cells, time.perf_counter() - started)
    if mode == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    runs = []
    for attempt in range(2 if mode == "ray" else 1):  # Ray: a cold job on fresh workers, then a warm one
        started = time.perf_counter()
        manifest = tokenize([path], out, vocab=vocab, options=TokenizeOptions(obs_columns={"cell_type": "cell_type"}),
                            executor="local" if mode == "local" else "ray", progress=False, overwrite=True)
        runs.append(_timed(manifest["num_cells"], time.perf_counter() - started))
    return runs[-1] if len(runs) == 1 else {**runs[1], "cold": runs[0]}


def _timed(cells: int, seconds: float) -> dict:
    return {"cells": cells, "seconds": round(seconds, 3), "cells_per_s": round(cells / seconds, 1), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM; ru_maxrss would carry the parent's over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _spawn(mode: str, path: Path, vocab: str, workers: int = 1) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", mode, str(path), vocab, str(workers)],
                          capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"case {mode} {vocab} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gf-tokenize-bench"))
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        mode, path, vocab, workers = args.case
        print(json.dumps(run_case(mode, path, vocab, int(workers))))
        return

    import numba
    import pyarrow
    import ray

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {n: make_dataset(n, workdir / f"pbmc_resampled_{n}.h5ad") for n in args.cells}
    _spawn("local", files[min(files)], "gc30M")  # compile and cache the numba kernel before timing
    results = {}
    for n, path in files.items():
        for vocab in ("gc30M", "gc104M"):
            results[f"{n}/{vocab}/a_local"] = _spawn("local", path, vocab)
        results[f"{n}/gc30M/b_ray_2_workers"] = _spawn("ray", path, "gc30M", 2)
        results[f"{n}/gc30M/c_geneformer_style"] = _spawn("geneformer_style", path, "gc30M")
        results[f"{n}/gc104M/c_geneformer_style"] = _spawn("geneformer_style", path, "gc104M")
        print(json.dumps({n: {k: v for k, v in results.items() if k.startswith(f"{n}/")}}), file=sys.stderr)
    big, small = max(files), min(files)
    speed = lambda key: results[key]["cells_per_s"]
    ratios = {
        "a_over_c_V1": round(speed(f"{big}/gc30M/a_local") / speed(f"{big}/gc30M/c_geneformer_style"), 2),
        "a_over_c_V2": round(speed(f"{big}/gc104M/a_local") / speed(f"{big}/gc104M/c_geneformer_style"), 2),
        "a_V2_over_a_V1": round(speed(f"{big}/gc104M/a_local") / speed(f"{big}/gc30M/a_local"), 2),
        "b_over_a_V1": round(speed(f"{big}/gc30M/b_ray_2_workers") / speed(f"{big}/gc30M/a_local"), 2),
        "b_cold_over_a_V1": round(results[f"{big}/gc30M/b_ray_2_workers"]["cold"]["cells_per_s"] / speed(f"{big}/gc30M/a_local"), 2),
        "a_peak_rss_mb_small_vs_big": [results[f"{small}/gc30M/a_local"]["peak_rss_mb"], results[f"{big}/gc30M/a_local"]["peak_rss_mb"]],
    }
    print(json.dumps({
        "figure": "tokenize_throughput",
        "unit": "cells/s",
        "config": {"cells": args.cells, "source": "PBMC3k resampled with binomial thinning", "cells_per_shard": 10_000},
        "results": results,
        "ratios": ratios,
        "targets": {"a_over_c": ">= 2.5", "a_V2_over_a_V1": ">= 0.8", "b_over_a_V1": ">= 1.7", "a_peak_rss_mb": "< 1024, flat in cells"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                     "pyarrow": pyarrow.__version__, "ray": ray.__version__},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
