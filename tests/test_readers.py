"""Ring 1: the chunked readers give the same cells whatever the on-disk layout (CSR, CSC, dense, loom, layers)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from geneformer_ray.data.readers import open_counts
from geneformer_ray.data.encode import TokenizeOptions
from geneformer_ray.data.tokenize import tokenize

from conftest import PBMC3K, PBMC_SMALL, read_corpus_table


@pytest.fixture(scope="module")
def subset():
    adata = ad.read_h5ad(PBMC3K)[:300].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


def _tokens(path, tmp_path, **options):
    out = tmp_path / f"corpus-{path.stem}-{'-'.join(map(str, options.values()))}"
    tokenize([path], out, vocab="gc104M", options=TokenizeOptions(obs_columns={"cell_type": "cell_type"}, **options),
             cells_per_shard=128, executor="local", progress=False)
    table = read_corpus_table(out)
    return table["cell_id"].to_pylist(), table["input_ids"].to_pylist(), table["cell_type"].to_pylist()


def test_layouts_give_identical_tokens(subset, tmp_path):
    csr = tmp_path / "csr.h5ad"
    subset.write_h5ad(csr)
    expected = _tokens(csr, tmp_path)
    assert len(expected[0]) == 300

    dense = subset.copy()
    dense.X = subset.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    csc = subset.copy()
    csc.X = sp.csc_matrix(subset.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    layered = subset.copy()
    layered.layers["counts"] = subset.X.copy()
    layered.X = sp.csr_matrix(subset.X.astype(np.float32) / 7.3)  # normalised X, raw counts in a layer
    layered.raw = subset.copy()
    layered.write_h5ad(tmp_path / "layered.h5ad")

    assert _tokens(tmp_path / "dense.h5ad", tmp_path) == expected
    assert _tokens(tmp_path / "csc.h5ad", tmp_path) == expected
    assert _tokens(tmp_path / "layered.h5ad", tmp_path, layer="counts") == expected
    assert _tokens(tmp_path / "layered.h5ad", tmp_path, layer="raw") == expected


def test_loom_gives_identical_tokens(subset, tmp_path):
    loompy = pytest.importorskip("loompy")
    csr = tmp_path / "csr.h5ad"
    subset.write_h5ad(csr)
    expected = _tokens(csr, tmp_path)
    loom = tmp_path / "cells.loom"
    loompy.create(
        str(loom), subset.X.T.tocsr(),
        row_attrs={"ensembl_id": subset.var["ensembl_id"].astype(str).to_numpy(), "Gene": subset.var_names.to_numpy()},
        col_attrs={"CellID": subset.obs_names.to_numpy(), "n_counts": subset.obs["n_counts"].to_numpy(),
                   "cell_type": subset.obs["cell_type"].astype(str).to_numpy()},
    )
    assert _tokens(loom, tmp_path) == expected


def test_row_ranges_read_only_what_is_asked(tmp_path):
    with open_counts(PBMC3K) as f:
        assert (f.n_cells, f.n_genes) == (2638, 13714)
        whole = ad.read_h5ad(PBMC3K).X
        part = f.read_counts(1000, 1010)
        assert (part != whole[1000:1010]).nnz == 0
        assert list(f.read_obs("cell_type", 0, 2)) == ["Memory CD4 T", "B"]
        assert list(f.read_obs(None, 0, 1)) == ["AAACATACAACCAC-1"]
        assert "ensembl_id" in f.var_columns()


def test_obs_without_ensembl_column_uses_symbols(tmp_path):
    small = ad.read_h5ad(PBMC_SMALL)
    del small.var["ensembl_id"]
    small.write_h5ad(tmp_path / "symbols.h5ad")
    manifest = tokenize([tmp_path / "symbols.h5ad"], tmp_path / "out", vocab="gc30M", executor="local", progress=False)
    genes = manifest["sources"][0]["genes"]
    assert genes["id_column"] == "var index"
    assert genes["genes_in_vocab"] > 200 and manifest["num_cells"] == 80
