"""Rings 1-2: every bad input gets a clear error naming the input and the fix, and nothing half-written."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from geneformer_ray.data.encode import TokenizeOptions
from geneformer_ray.data.tokenize import tokenize
from geneformer_ray.data.vocab import load_vocab

from conftest import PBMC_SMALL, make_adata, read_corpus_table


def _run(inputs, out, **kwargs):
    kwargs.setdefault("executor", "local")
    return tokenize(inputs if isinstance(inputs, list) else [inputs], out, progress=False, **kwargs)


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary leftovers


@pytest.fixture
def small(tmp_path):
    return ad.read_h5ad(PBMC_SMALL)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.h5ad does not exist"):
        _run(tmp_path / "nope.h5ad", tmp_path / "out")
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"junk\.h5ad cannot be opened as HDF5"):
        _run(junk, tmp_path / "out")
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b")
    with pytest.raises(ValueError, match=r"cells\.csv is not \.h5ad or \.loom"):
        _run(csv, tmp_path / "out")
    with pytest.raises(ValueError, match="matches no file"):
        _run(str(tmp_path / "*.loom"), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "poison, message",
    [
        (-1.0, r"1 negative values \(first: -1.0 at cell 'ATGCCAGAACGACT', gene"),
        (np.nan, r"1 nan or inf values"),
        (0.5, r"1 non-integer values .*--allow-non-integer"),
    ],
)
def test_values_that_are_not_raw_counts(small, tmp_path, poison, message):
    X = sp.csr_matrix(small.X, dtype=np.float32)
    X.data[0] = poison
    small.X = X
    small.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match=message) as info:
        _run(tmp_path / "bad.h5ad", tmp_path / "out", cells_per_shard=30)
    assert "bad.h5ad" in str(info.value)
    _assert_nothing_written(tmp_path / "out")


def test_non_integer_counts_accepted_on_request(small, tmp_path):
    X = sp.csr_matrix(small.X, dtype=np.float32)
    X.data[:5] += 0.5
    small.X = X
    small.write_h5ad(tmp_path / "ambient.h5ad")
    manifest = _run(tmp_path / "ambient.h5ad", tmp_path / "out", options=TokenizeOptions(allow_non_integer=True))
    assert manifest["num_cells"] == 80


def test_unmappable_gene_identifiers(small, tmp_path):
    del small.var["ensembl_id"]
    small.var_names = [f"feature_{i}" for i in range(small.n_vars)]
    small.write_h5ad(tmp_path / "opaque.h5ad")
    with pytest.raises(ValueError, match=r"230 of 230 gene identifiers in the var index could not be mapped.*--gene-id-column"):
        _run(tmp_path / "opaque.h5ad", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_too_few_mappable_symbols(small, tmp_path):
    del small.var["ensembl_id"]
    names = list(small.var_names)
    small.var_names = names[:50] + [f"feature_{i}" for i in range(180)]  # 50 of 230 map
    small.write_h5ad(tmp_path / "mostly_opaque.h5ad")
    unmapped = 180 + sum(load_vocab("gc30M").to_ensembl(n) is None for n in names[:50])  # a few old symbols too
    with pytest.raises(ValueError, match=rf"{unmapped} of 230 gene identifiers .* min_mapped_fraction"):
        _run(tmp_path / "mostly_opaque.h5ad", tmp_path / "out")
    manifest = _run(tmp_path / "mostly_opaque.h5ad", tmp_path / "out", options=TokenizeOptions(min_mapped_fraction=0.1))
    assert manifest["sources"][0]["genes"]["genes_unmapped"] == unmapped


def test_empty_matrix(small, tmp_path):
    small[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(ValueError, match=r"empty.h5ad: the count matrix is empty \(0 cells x 230 genes\)"):
        _run(tmp_path / "empty.h5ad", tmp_path / "out")


def test_every_cell_filtered_out(small, tmp_path):
    small.obs["filter_pass"] = 0
    small.write_h5ad(tmp_path / "filtered.h5ad")
    with pytest.raises(ValueError, match=r"every cell was dropped \(80 by 'filter_pass' != 1"):
        _run(tmp_path / "filtered.h5ad", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_missing_obs_and_var_columns(tmp_path):
    with pytest.raises(ValueError, match=r"obs has no column 'disease'; available: orig.ident"):
        _run(PBMC_SMALL, tmp_path / "out", options=TokenizeOptions(obs_columns={"disease": "disease"}))
    with pytest.raises(ValueError, match=r"var has no column 'gene_ids'"):
        _run(PBMC_SMALL, tmp_path / "out", options=TokenizeOptions(gene_id_column="gene_ids"))
    with pytest.raises(ValueError, match="reserved"):
        TokenizeOptions(obs_columns={"x": "input_ids"})


def test_bad_total_counts_column(tmp_path):
    adata = make_adata([[1, 2]], ["ENSG00000198851", "ENSG00000000003"], obs={"n_counts": [0]})
    adata.write_h5ad(tmp_path / "zero_total.h5ad")
    with pytest.raises(ValueError, match="total count column that is zero"):
        _run(tmp_path / "zero_total.h5ad", tmp_path / "out", vocab="gc30M")


def test_genes_of_another_species(tmp_path):
    adata = make_adata([[1, 2]], ["ENSMUSG00000000001", "ENSMUSG00000000028"])
    adata.write_h5ad(tmp_path / "mouse.h5ad")
    with pytest.raises(ValueError, match="none of the 2 genes in the var\\['ensembl_id'\\] is in the gc30M vocabulary.*species"):
        _run(tmp_path / "mouse.h5ad", tmp_path / "out", vocab="gc30M")


def test_mouse_gene_symbols_are_not_read_as_their_human_namesakes(small, tmp_path):
    """Cd74, Actb ... match CD74, ACTB case-insensitively: a mouse file would tokenize as human without a word."""
    del small.var["ensembl_id"]
    human = [n for n in small.var_names if n.isupper() and n[:1].isalpha()]
    small.var_names = [n.capitalize() if n in human else n for n in small.var_names]  # Cd74-style, as mouse files write them
    small.write_h5ad(tmp_path / "mouse_symbols.h5ad")
    with pytest.raises(ValueError, match=r"of the 230 gene symbols in the var index are written like mouse genes "
                                         r"\(e.g. \['Ms4a1', 'Cd79b', 'Cd79a'\]\).*human genes.*human orthologs") as refused:
        _run(tmp_path / "mouse_symbols.h5ad", tmp_path / "out")
    assert int(str(refused.value).split(": ")[1].split(" of ")[0]) > 200  # most of them (C1qa-like ones not counted)
    _assert_nothing_written(tmp_path / "out")
    small.var_names = [n.upper() if n.upper() in human else n for n in small.var_names]  # the human symbols: accepted
    small.write_h5ad(tmp_path / "human_symbols.h5ad")
    assert _run(tmp_path / "human_symbols.h5ad", tmp_path / "human")["num_cells"] == 80


def test_existing_output_is_refused_then_replaced_safely(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not empty; choose another --out or pass --overwrite"):
        _run(PBMC_SMALL, out)
    assert (out / "precious.txt").read_text() == "keep me"
    # a run that fails half-way with --overwrite leaves the old folder untouched
    bad = ad.read_h5ad(PBMC_SMALL)
    X = sp.csr_matrix(bad.X, dtype=np.float32)
    X.data[-1] = -3
    bad.X = X
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="negative"):
        _run([PBMC_SMALL, tmp_path / "bad.h5ad"], out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    _run(PBMC_SMALL, out, overwrite=True)
    assert not (out / "precious.txt").exists() and len(read_corpus_table(out)) == 80


def test_failure_inside_a_ray_task_leaves_nothing(ray_session, tmp_path, small):
    X = sp.csr_matrix(small.X, dtype=np.float64)
    X.data[-1] = 2.5
    small.X = X
    small.write_h5ad(tmp_path / "late_bad.h5ad")
    with pytest.raises(ValueError, match="non-integer"):
        _run(tmp_path / "late_bad.h5ad", tmp_path / "out", executor="ray", cells_per_shard=20)
    _assert_nothing_written(tmp_path / "out")
