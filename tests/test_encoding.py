"""Ring 1: rank value encoding on hand-computed cells, and token-for-token parity with Geneformer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest

from geneformer_ray.data.encode import tokenize_anndata
from geneformer_ray.data.vocab import load_vocab

from conftest import PBMC3K, REFERENCE, gene, make_adata, tiny_vocab

# tiny vocabulary: token id of gene Gi is i+1 (V1) or i+3 (V2); medians G1..G6 = 1, 2, 4, 0.5, 1, 2
T = {i: i + 1 for i in range(1, 7)}


def ids(table):
    return table["input_ids"].to_pylist()


def test_hand_computed_ranking():
    # cell0, n_counts 10: values G1 10/1=10 (x1e4/10) ... scale drops out: G1 1, G2 4/2=2, G3 4/4=1 (tie with G1), G4 1/0.5=2 (tie with G2)
    adata = make_adata([[1, 4, 4, 1, 0, 0]], [gene(i) for i in range(1, 7)], obs={"n_counts": [10]})
    table = tokenize_anndata(adata, vocab=tiny_vocab())
    # ties keep column order: G2 before G4, G1 before G3
    assert ids(table) == [[T[2], T[4], T[1], T[3]]]
    assert table["length"].to_pylist() == [4]
    assert table["cell_id"].to_pylist() == ["cell0"]


def test_normalisation_uses_total_counts_per_cell():
    # same genes, different totals: the ranking within a cell does not depend on n_counts,
    # but n_counts must be the per-cell total, not a global constant
    adata = make_adata([[3, 0, 0, 0, 0, 2], [1, 0, 0, 0, 0, 6]], [gene(i) for i in range(1, 7)], obs={"n_counts": [5, 7]})
    # cell0: G1 3/1=3, G6 2/2=1 -> G1, G6 ; cell1: G1 1, G6 3 -> G6, G1
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab())) == [[T[1], T[6]], [T[6], T[1]]]


def test_truncation_at_the_input_size():
    adata = make_adata([[6, 5, 4, 3, 2, 1]], [gene(i) for i in range(1, 7)], obs={"n_counts": [21]})
    # values: G1 6, G2 2.5, G3 1, G4 6 (tie with G1, later column), G5 2, G6 0.5
    full = [T[1], T[4], T[2], T[5], T[3], T[6]]
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab())) == [full]
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab(model_input_size=3))) == [full[:3]]


def test_v2_wraps_in_cls_eos_within_the_input_size():
    vocab = tiny_vocab(cls_eos=True, model_input_size=4)
    cls, eos = vocab.cls_id, vocab.eos_id
    adata = make_adata([[6, 5, 4, 3, 2, 1]], [gene(i) for i in range(1, 7)], obs={"n_counts": [21]})
    tok = {i: vocab.token_ids[gene(i)] for i in range(1, 7)}
    assert ids(tokenize_anndata(adata, vocab=vocab)) == [[cls, tok[1], tok[4], eos]]


def test_duplicate_ensembl_ids_are_summed_or_repeated():
    # columns 0 and 2 are both G3 (median 4): 4 + 8 = 12 -> 3; G2 5/2 = 2.5
    var = [gene(3), gene(2), gene(3)]
    adata = make_adata([[4, 5, 8]], var, obs={"n_counts": [17]})
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab())) == [[T[3], T[2]]]
    # Geneformer V1 behaviour: each column separately, G3 twice (8/4=2 < 2.5 < ... 4/4=1)
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab(), sum_duplicates=False)) == [[T[2], T[3], T[3]]]
    counts = tokenize_anndata(adata, vocab=tiny_vocab(), keep_counts=True)["counts"].to_pylist()
    assert counts == [[12.0, 5.0]]


def test_symbols_are_mapped_case_insensitively():
    adata = make_adata([[1, 2, 0]], ["gene1", "GENE2", "NOT_A_GENE"], obs={"n_counts": [3]}, id_column=None)
    # G1 1/1 = 1, G2 2/2 = 1 (tie: column order)
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab(), min_mapped_fraction=0.5)) == [[T[1], T[2]]]


def test_filter_pass_zero_cells_and_computed_totals():
    counts = [
        [1, 0, 0, 0, 0, 0],  # kept
        [5, 5, 0, 0, 0, 0],  # filter_pass 0: skipped
        [0, 0, 0, 0, 0, 0],  # no counts at all: dropped
        [1, 0, 0, 0, 0, 0],  # kept
    ]
    adata = make_adata(counts, [gene(i) for i in range(1, 7)], obs={"filter_pass": [1, 0, 1, 1]})
    table = tokenize_anndata(adata, vocab=tiny_vocab())
    assert table["cell_id"].to_pylist() == ["cell0", "cell3"]
    # a cell whose only genes are outside the vocabulary is dropped as well
    adata = make_adata([[3, 1], [0, 2]], [gene(1), "ENSG99999999999"])
    assert tokenize_anndata(adata, vocab=tiny_vocab(), min_mapped_fraction=0)["cell_id"].to_pylist() == ["cell0"]


def test_totals_computed_from_all_genes_when_absent():
    # G1 2/1 = 2 vs G2 6/2 = 3 -> G2 first; n_counts from the whole row (incl. non-vocabulary genes)
    adata = make_adata([[2, 6, 100]], [gene(1), gene(2), "ENSG99999999999"])
    assert ids(tokenize_anndata(adata, vocab=tiny_vocab(), min_mapped_fraction=0)) == [[T[2], T[1]]]


def test_metadata_columns_are_carried_and_renamed():
    adata = make_adata([[1, 0], [0, 1]], [gene(1), gene(2)], obs={"ct": ["T", "B"], "age": [30, 41]})
    adata.obs["ct"] = adata.obs["ct"].astype("category")
    table = tokenize_anndata(adata, vocab=tiny_vocab(), obs_columns={"ct": "cell_type", "age": "age"})
    assert table["cell_type"].to_pylist() == ["T", "B"]
    assert table["age"].to_pylist() == [30, 41]


# -- parity with Geneformer's own tokenizer on the real PBMC3k ------------------------------------
@pytest.fixture(scope="module")
def pbmc3k():
    return ad.read_h5ad(PBMC3K)


def _duplicate_id_cells(adata) -> set[str]:
    """Cells with two or more non-zero columns sharing a vocabulary Ensembl ID (V1 differs there by design)."""
    v1 = load_vocab("gc30M")
    ens = adata.var["ensembl_id"].astype(str).to_numpy()
    dup_ids = {g for g in set(ens) if g in v1.token_ids and (ens == g).sum() > 1}
    cols = [np.flatnonzero(ens == g) for g in dup_ids]
    X = adata.X.tocsc()
    hits = set()
    for group in cols:
        nonzero = (X[:, group] > 0).sum(axis=1).A1
        hits |= set(adata.obs_names[nonzero > 1])
    return hits


@pytest.mark.parametrize("version, vocab, sum_duplicates", [("V1", "gc30M", False), ("V1", "gc30M", True), ("V2", "gc104M", True)])
def test_pbmc3k_matches_geneformer_token_for_token(pbmc3k, version, vocab, sum_duplicates):
    reference = pq.read_table(REFERENCE / f"pbmc3k_{version}.parquet").to_pandas()
    table = tokenize_anndata(pbmc3k, vocab=vocab, sum_duplicates=sum_duplicates, obs_columns={"cell_type": "cell_type"})
    ours = dict(zip(table["cell_id"].to_pylist(), ids(table)))
    assert len(ours) == len(reference) == 2638
    differ = {name for name, ref in zip(reference.obs_name, reference.input_ids) if ours[name] != list(ref)}
    if version == "V1" and sum_duplicates:
        # the one deliberate difference: Geneformer V1 emits a duplicated Ensembl ID twice, we sum it
        expected = _duplicate_id_cells(pbmc3k)
        assert len(expected) == 24 and differ == expected
    else:
        assert differ == set()
    assert table["cell_type"].to_pylist() == reference.cell_type.tolist()
    assert table["length"].to_pylist() == [len(x) for x in ids(table)]


# -- the block sort against a plain per-cell stable argsort ---------------------------------------
def _reference_encode(X, n_counts, col_token, inv_median, max_genes):
    cells = []
    for r in range(X.shape[0]):
        row = X[r]
        keep = (col_token[row.indices] >= 0) & (row.data != 0)
        cols, x = row.indices[keep], row.data[keep].astype(np.float64)
        values = ((x * (1 / n_counts[r])) * 1e4) * inv_median[cols]
        order = np.argsort(-values, kind="stable")
        cells.append(col_token[cols][order][:max_genes].tolist())
    return cells


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_sort_equals_stable_argsort_with_ties_and_near_ties(seed):
    import scipy.sparse as sp

    from geneformer_ray.data.encode import GenePlan, rank_value_encode

    rng = np.random.default_rng(seed)
    n_cells, n_genes = 300, 3000
    X = sp.random(n_cells, n_genes, density=0.3, random_state=seed, format="csr",
                  data_rvs=lambda k: rng.integers(1, 4, k)).astype(np.int32)  # small counts: many exact ties
    medians = rng.choice([0.5, 1.0, 2.0], n_genes)  # shared medians: exact ties between genes
    near = rng.random(n_genes) < 0.2
    medians[near] *= 1 + rng.integers(1, 50, near.sum()) * 2.0**-40  # values equal in their top ~40 bits
    col_token = np.arange(n_genes, dtype=np.int32) + 2
    col_token[rng.random(n_genes) < 0.1] = -1  # some genes outside the vocabulary
    n_counts = np.asarray(X.sum(axis=1)).ravel() + 5.0
    in_vocab = col_token >= 0
    plan = GenePlan(
        col_to_slot=np.where(in_vocab, np.cumsum(in_vocab) - 1, -1).astype(np.int32),
        slot_token=col_token[in_vocab], slot_inv_median=(1.0 / medians)[in_vocab],
        max_genes=700, cls_id=-1, eos_id=-1, model_input_size=700, stats={},
    )
    tokens, offsets, _ = rank_value_encode(X, n_counts, plan, keep_counts=False)
    ours = [tokens[offsets[r]:offsets[r + 1]].tolist() for r in range(n_cells)]
    expected = _reference_encode(X, n_counts, col_token, 1.0 / medians, 700)
    assert ours == expected
    assert max(len(c) for c in ours) == 700  # truncation exercised
