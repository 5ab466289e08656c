"""Rank value encoding of raw counts into Geneformer token ids.

    geneformer-ray tokenize pbmc3k.h5ad --vocab gc30M --out corpus/     # the distributed job (job.py)

    from geneformer_ray.data.encode import tokenize_anndata
    table = tokenize_anndata(adata, vocab="gc104M", obs_columns={"cell_type": "cell_type"})

One cell: raw counts of vocabulary genes (duplicate Ensembl IDs summed), divided by the cell's
total count, times 10,000, divided by each gene's non-zero median over the pretraining corpus;
non-zero genes sorted descending (stable: ties keep column order), mapped to token ids, truncated to
the model input size (V2 vocabularies wrap the cell in <cls> ... <eos>). The arithmetic is
Geneformer's, in float64 and in its order, so the tokens match Geneformer's tokenizer exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
import re

import numba
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from pydantic import model_validator

from geneformer_ray.data.vocab import Vocabulary, load_vocab
from geneformer_ray.settings import Settings

TARGET_SUM = 1e4
RESERVED_COLUMNS = ("input_ids", "length", "cell_id", "counts", "pretrain_split")  # written by the tokenizer itself
HISTOGRAM_BIN = 64  # length histogram bin width in tokens


class TokenizeOptions(Settings):
    """How cells are read and what is carried: the data stage's settings; crosses the Ray boundary as
    ``to_dict()``."""

    count_column: str = "n_counts"  # obs total counts; computed from the matrix when absent
    filter_column: str = "filter_pass"  # cells with a value other than 1 are skipped; ignored when absent
    obs_columns: dict[str, str] | None = None  # obs column -> output column name; None: every obs column
    gene_id_column: str | None = None  # var column with gene IDs/symbols; default 'ensembl_id' or the var index
    cell_id_column: str | None = None  # obs column for cell_id; default the obs names
    layer: str | None = None  # count matrix: X (default), 'raw', or a layer name
    keep_counts: bool = False  # also write the (summed) raw count of every token
    allow_non_integer: bool = False  # accept non-integer values (e.g. ambient-corrected counts)
    sum_duplicates: bool = True  # sum genes sharing an Ensembl ID (False: Geneformer V1, token repeated)
    min_mapped_fraction: float = 0.5  # refuse files whose gene IDs mostly do not map to Ensembl IDs
    val_fraction: float = 0.02  # pretraining validation cells, by a hash of cell_id, recorded in each shard
    max_genes: int | None = None  # keep each cell's top-ranked genes up to this (default: the model input size)

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 <= self.min_mapped_fraction <= 1.0:
            raise ValueError(f"min_mapped_fraction={self.min_mapped_fraction} must be between 0 and 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_genes is not None and self.max_genes < 1:
            raise ValueError(f"max_genes={self.max_genes} must be at least 1 (or None for the model input size)")
        clash = set(RESERVED_COLUMNS).intersection((self.obs_columns or {}).values())
        if clash:
            raise ValueError(f"obs columns cannot be renamed to {sorted(clash)}: those output columns are reserved; rename them")
        return self

    def resolve_obs_columns(self, available: list[str], source: str) -> dict[str, str]:
        """The obs columns to carry from one input: the ones asked for, or all (reserved names get 'obs_')."""
        wanted = list(self.obs_columns or []) + ([self.cell_id_column] if self.cell_id_column else [])
        for column in wanted:
            if column not in available:
                raise ValueError(f"{source}: obs has no column {column!r}; available: {', '.join(available) or 'none'}")
        if self.obs_columns is None:
            return {c: f"obs_{c}" if c in RESERVED_COLUMNS else c for c in available}
        return dict(self.obs_columns)


# -- genes: var identifiers -> vocabulary slots ---------------------------------------------------
@dataclass
class GenePlan:
    """Per-file mapping from matrix columns to the genes that are encoded, plus the vocabulary facts
    the encoder needs; small enough to ship to every task (the vocabulary itself is not)."""

    col_to_slot: np.ndarray  # (n_genes,) int32, -1 for columns outside the vocabulary
    slot_token: np.ndarray  # (n_slots,) int32 token id of each slot
    slot_inv_median: np.ndarray  # (n_slots,) float64, 1 / non-zero median
    max_genes: int  # genes kept per cell
    cls_id: int  # -1 when the vocabulary has no <cls>/<eos> wrapping
    eos_id: int
    model_input_size: int
    stats: dict

    def to_dict(self) -> dict:
        return asdict(self)


def plan_genes(var_ids, vocab: Vocabulary, *, sum_duplicates: bool = True, min_mapped_fraction: float = 0.0,
               source: str = "input", id_column: str = "var index", max_genes: int | None = None) -> GenePlan:
    """Map the matrix columns' gene identifiers (Ensembl IDs, old IDs or symbols) into the vocabulary."""
    var_ids = list(var_ids)
    n = len(var_ids)
    ensembl = [vocab.to_ensembl(x) for x in var_ids]
    col_to_slot = np.full(n, -1, np.int32)
    slot_of: dict[str, int] = {}
    slot_genes: list[str] = []
    for col, gene in enumerate(ensembl):
        if gene is None or gene not in vocab.token_ids or gene in vocab.special_token_ids:
            continue
        if sum_duplicates and gene in slot_of:
            col_to_slot[col] = slot_of[gene]
            continue
        slot_of[gene] = len(slot_genes)
        col_to_slot[col] = len(slot_genes)
        slot_genes.append(gene)
    _refuse_mouse_symbols(var_ids, source=source, id_column=id_column)
    mapped = sum(g is not None for g in ensembl)
    in_vocab = int((col_to_slot >= 0).sum())
    dup_ids = Counter(g for g, s in zip(ensembl, col_to_slot) if s >= 0)
    stats = {
        "id_column": id_column,
        "genes_total": n,
        "genes_mapped": mapped,
        "genes_unmapped": n - mapped,
        "genes_in_vocab": in_vocab,
        "genes_not_in_vocab": mapped - in_vocab,
        "vocab_genes_used": len(set(slot_genes)),
        "duplicate_ids": sum(1 for c in dup_ids.values() if c > 1),
        "duplicate_columns_summed": sum(c - 1 for c in dup_ids.values() if c > 1) if sum_duplicates else 0,
    }
    if mapped and in_vocab == 0:
        raise ValueError(
            f"{source}: none of the {n:,} genes in the {id_column} is in the {vocab.name} vocabulary ({mapped:,} map to "
            f"Ensembl IDs, e.g. {[g for g in ensembl if g][:3]}); Geneformer vocabularies are human genes: check the "
            "species, or pass gene_id_column=... (--gene-id-column) naming the right var column"
        )
    if in_vocab == 0 or (n and mapped / n < min_mapped_fraction):
        example = [x for x, g in zip(var_ids, ensembl) if g is None][:3]
        raise ValueError(
            f"{source}: {n - mapped:,} of {n:,} gene identifiers in the {id_column} could not be mapped to Ensembl IDs "
            f"(e.g. {example}) and {in_vocab:,} are in the {vocab.name} vocabulary; pass gene_id_column=... "
            "(--gene-id-column) naming a var column with Ensembl IDs or gene symbols"
            + (f", or lower min_mapped_fraction (now {min_mapped_fraction})" if in_vocab else "")
        )
    return GenePlan(
        col_to_slot=col_to_slot,
        slot_token=np.array([vocab.token_ids[g] for g in slot_genes], np.int32),
        slot_inv_median=np.array([1.0 / vocab.gene_medians[g] for g in slot_genes], np.float64),
        max_genes=min(vocab.max_genes_per_cell, max_genes or vocab.max_genes_per_cell),
        cls_id=vocab.cls_id if vocab.adds_cls_eos else -1,
        eos_id=vocab.eos_id if vocab.adds_cls_eos else -1,
        model_input_size=vocab.model_input_size,
        stats=stats,
    )


_MOUSE_STYLE = re.compile(r"^[A-Z][a-z][A-Za-z0-9.-]*$")  # Cd74, Actb, Gm12345; human symbols are upper case


def _refuse_mouse_symbols(var_ids: list, *, source: str, id_column: str) -> None:
    """Mouse symbols (Cd74, Actb) would map case-insensitively onto their human namesakes (CD74, ACTB)
    and be tokenized as human genes without a word; refuse when most symbols are written the mouse way."""
    symbols = [x for x in var_ids if isinstance(x, str) and x and not x.upper().startswith("ENS")]
    mouse = [x for x in symbols if _MOUSE_STYLE.match(x)]
    if symbols and len(mouse) > len(symbols) / 2:
        raise ValueError(
            f"{source}: {len(mouse):,} of the {len(symbols):,} gene symbols in the {id_column} are written like mouse "
            f"genes (e.g. {mouse[:3]}); Geneformer vocabularies are human genes, and these would be read as their human "
            "namesakes: map them to human orthologs first (e.g. Ensembl BioMart or g:Profiler's orth) and pass the "
            "column of human Ensembl IDs as gene_id_column=... (--gene-id-column)")


# -- the hot path ---------------------------------------------------------------------------------
# Sorting every cell separately in compiled code runs at ~35 us a cell; one vectorised numpy sort
# of a whole block of cells runs ~8x faster. So each value becomes a uint64 key
#   [ row | top bits of the value, inverted so larger sorts first | position in the row ]
# one np.sort orders the block, and a pass over the sorted keys settles, exactly and stably, the
# rare runs whose values share the kept top bits. The result equals a stable descending argsort
# of each cell's float64 values.
_BLOCK_ROWS = 4096


@numba.njit(cache=True, nogil=True)
def _gather(indptr, indices, data, inv_n_counts, col_to_slot, slot_inv_median, values, slots, sums, row_k):  # pragma: no cover
    """Per row: vocabulary entries in column order (duplicate IDs summed) and their normalised values."""
    pos = np.full(slot_inv_median.shape[0], -1, np.int64)  # slot -> entry index in this row
    e = 0
    for r in range(indptr.shape[0] - 1):
        first = e
        for j in range(indptr[r], indptr[r + 1]):
            s = col_to_slot[indices[j]]
            if s < 0 or data[j] == 0:
                continue
            p = pos[s]
            if p < 0:
                pos[s] = e
                slots[e] = s
                sums[e] = data[j]
                e += 1
            else:
                sums[p] += data[j]
        for i in range(first, e):
            pos[slots[i]] = -1
            # Geneformer's arithmetic and order: ((x * (1 / n_counts)) * 1e4) * (1 / median)
            values[i] = ((sums[i] * inv_n_counts[r]) * 1e4) * slot_inv_median[slots[i]]
        row_k[r] = e - first
    return e


@numba.njit(cache=True, nogil=True)
def _make_keys(values, row_k, index_bits, value_bits, keys):  # pragma: no cover
    bits = values.view(np.uint64)
    vmask = (np.uint64(1) << np.uint64(value_bits)) - np.uint64(1)
    drop = np.uint64(63 - value_bits)
    vshift = np.uint64(index_bits)
    rshift = np.uint64(index_bits + value_bits)
    e = 0
    for r in range(row_k.shape[0]):
        for i in range(row_k[r]):
            top = bits[e] >> drop  # values are positive: their bit patterns sort like the values
            keys[e] = (np.uint64(r) << rshift) | ((vmask - top) << vshift) | np.uint64(i)
            e += 1


@numba.njit(cache=True, nogil=True)
def _emit(keys, values, slots, sums, row_k, index_bits, slot_token, max_genes, cls_id, eos_id,
          out_tokens, out_counts, out_offsets, o):  # pragma: no cover
    keep_counts = out_counts.shape[0] == out_tokens.shape[0]
    """Decode sorted keys into tokens; order exact-value ties and near-ties stably; truncate; wrap."""
    imask = (np.uint64(1) << np.uint64(index_bits)) - np.uint64(1)
    prefix_shift = np.uint64(index_bits)
    n_rows = row_k.shape[0]
    order = np.empty(max(1, row_k.max()), np.int64)
    start = 0  # first entry of this row in values/keys
    for r in range(n_rows):
        k = row_k[r]
        for j in range(k):
            order[j] = start + np.int64(keys[start + j] & imask)
        j = 1
        while j < k:  # runs that share the kept value bits: insertion sort by exact value, descending
            if (keys[start + j] >> prefix_shift) == (keys[start + j - 1] >> prefix_shift):
                i = j
                while i > 0 and (keys[start + i] >> prefix_shift) == (keys[start + i - 1] >> prefix_shift) \
                        and values[order[i]] > values[order[i - 1]]:
                    order[i], order[i - 1] = order[i - 1], order[i]
                    i -= 1
            j += 1
        if k > 0:
            if cls_id >= 0:
                out_tokens[o] = cls_id
                if keep_counts:
                    out_counts[o] = 0.0
                o += 1
            for j in range(min(k, max_genes)):
                out_tokens[o] = slot_token[slots[order[j]]]
                if keep_counts:
                    out_counts[o] = sums[order[j]]
                o += 1
            if eos_id >= 0:
                out_tokens[o] = eos_id
                if keep_counts:
                    out_counts[o] = 0.0
                o += 1
        out_offsets[r + 1] = o
        start += k
    return o


def rank_value_encode(counts: sp.csr_matrix, n_counts: np.ndarray, plan: GenePlan, *, keep_counts: bool = True):
    """Encode the rows of a cells x genes CSR matrix.

    Returns ``(tokens, offsets, token_counts)``: the flat int32 token ids, the (n_cells + 1,) int64
    row offsets into them (a cell without vocabulary genes has an empty row), and the summed raw
    count behind each token (0 for <cls>/<eos>; None unless ``keep_counts``).
    """
    counts = sp.csr_matrix(counts)
    n_rows = counts.shape[0]
    with np.errstate(divide="ignore"):
        inv_n_counts = 1.0 / np.asarray(n_counts, dtype=np.float64)
    capacity = counts.nnz + (2 * n_rows if plan.cls_id >= 0 else 0)
    tokens = np.empty(capacity, np.int32)
    token_counts = np.empty(capacity if keep_counts else 0, np.float64)
    offsets = np.zeros(n_rows + 1, np.int64)
    indptr = counts.indptr.astype(np.int64, copy=False)
    indices = counts.indices.astype(np.int32, copy=False)
    o = 0
    for r0 in range(0, n_rows, _BLOCK_ROWS):
        r1 = min(n_rows, r0 + _BLOCK_ROWS)
        lo, hi = indptr[r0], indptr[r1]
        block_indptr = indptr[r0 : r1 + 1] - lo
        width = int(np.diff(block_indptr).max()) if r1 > r0 else 0
        values, sums = np.empty(hi - lo, np.float64), np.empty(hi - lo, np.float64)
        slots = np.empty(hi - lo, np.int32)
        row_k = np.zeros(r1 - r0, np.int64)
        used = _gather(block_indptr, indices[lo:hi], counts.data[lo:hi].astype(np.float64), inv_n_counts[r0:r1], plan.col_to_slot,
                       plan.slot_inv_median, values, slots, sums, row_k)
        index_bits = max(1, width.bit_length())
        value_bits = 64 - index_bits - max(1, (r1 - r0 - 1).bit_length())
        keys = np.empty(used, np.uint64)
        _make_keys(values, row_k, index_bits, value_bits, keys)
        keys.sort()  # numpy's vectorised sort: the one step that dominates
        block_offsets = np.zeros(r1 - r0 + 1, np.int64)
        o_end = _emit(keys, values, slots, sums, row_k, index_bits, plan.slot_token, plan.max_genes,
                      plan.cls_id, plan.eos_id, tokens, token_counts, block_offsets, o)
        block_offsets[0] = o
        offsets[r0 + 1 : r1 + 1] = block_offsets[1:]
        o = o_end
    return tokens[:o], offsets, (token_counts[:o] if keep_counts else None)


def count_problems(counts: sp.csr_matrix, *, allow_non_integer: bool) -> dict:
    """Values that raw counts cannot have: {'negative': n, 'nan or inf': n, 'non-integer': n, 'first': (row, col)}."""
    data = counts.data
    masks = {"negative": data < 0}  # each mask computed once: this runs on every chunk
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        masks["nan or inf"] = ~finite
        if not allow_non_integer:
            masks["non-integer"] = finite & (data != np.floor(data))
    problems = {kind: int(np.count_nonzero(mask)) for kind, mask in masks.items()}
    bad = np.logical_or.reduce(list(masks.values()))
    first = int(np.argmax(bad)) if bad.any() else -1
    problems = {k: v for k, v in problems.items() if v}
    if first >= 0:
        row = int(np.searchsorted(counts.indptr, first, side="right") - 1)
        problems["first"] = (row, int(counts.indices[first]), float(data[first]))
    return problems


# -- cells -> Arrow -------------------------------------------------------------------------------
def encode_cells(counts: sp.csr_matrix, *, n_counts: np.ndarray | None, keep: np.ndarray | None,
                 cell_ids: np.ndarray, metadata: dict[str, np.ndarray], plan: GenePlan,
                 keep_counts: bool = False) -> tuple[pa.Table, dict]:
    """Encode one chunk of cells into an Arrow table (cells without vocabulary genes dropped) + stats."""
    n_in = counts.shape[0]
    if n_counts is None:
        n_counts = np.asarray(counts.sum(axis=1)).ravel()
    n_counts = np.asarray(n_counts, dtype=np.float64)
    if keep is not None:
        counts, n_counts, cell_ids = counts[keep], n_counts[keep], cell_ids[keep]
        metadata = {k: v[keep] for k, v in metadata.items()}
    tokens, offsets, token_counts = rank_value_encode(counts, n_counts, plan, keep_counts=keep_counts)
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    bad_totals = nonempty & ~(n_counts > 0)
    if bad_totals.any():
        i = int(np.argmax(bad_totals))
        raise ValueError(
            f"cell {cell_ids[i]!r} has counts but a total count of {n_counts[i]}; {int(bad_totals.sum()):,} cells "
            "have a total count column that is zero, negative or missing; fix it or drop the column to compute totals"
        )
    idx = np.flatnonzero(nonempty)
    columns = {
        "input_ids": _list_array(tokens, offsets, idx, pa.int32()),
        "length": pa.array(lengths[idx].astype(np.int32)),
        "cell_id": pa.array(np.asarray(cell_ids, dtype=object)[idx].astype(str), pa.string()),
    }
    if keep_counts:
        columns["counts"] = _list_array(token_counts.astype(np.float32), offsets, idx, pa.float32())
    for name, values in metadata.items():
        columns[name] = pa.array(_arrow_ready(np.asarray(values)[idx]), from_pandas=True)
    stats = {
        "cells_in": n_in,
        "cells_filtered": n_in - counts.shape[0],
        "cells_no_vocab_gene": int((~nonempty).sum()),
        "cells_out": int(idx.size),
        "tokens": int(lengths.sum()),
        "length_histogram": length_histogram(lengths[idx], plan.model_input_size).tolist(),
    }
    return pa.table(columns), stats


def length_histogram(lengths: np.ndarray, model_input_size: int) -> np.ndarray:
    num_bins = -(-model_input_size // HISTOGRAM_BIN)
    return np.bincount(np.minimum((np.asarray(lengths) - 1) // HISTOGRAM_BIN, num_bins - 1).clip(0), minlength=num_bins)


def _list_array(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, value_type) -> pa.ListArray:
    if rows.size == offsets.size - 1:  # nothing dropped: zero-copy
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))
    starts, stops = offsets[rows], offsets[rows + 1]
    new_offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int32)
    take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if rows.size else np.empty(0, np.int64)
    return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(values[take], value_type))


def _arrow_ready(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "O":
        # categories decoded from HDF5 can mix str and NaN; Arrow wants one type plus nulls
        return np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values], dtype=object)
    return values


# -- in-memory AnnData ----------------------------------------------------------------------------
def tokenize_anndata(adata, *, vocab: str | Vocabulary = "gc30M", options: TokenizeOptions | None = None,
                     **option_overrides) -> pa.Table:
    """Tokenize an in-memory AnnData; returns the corpus table (input_ids, length, cell_id, metadata).

    ``options`` / keyword overrides are the fields of :class:`TokenizeOptions`.
    """
    options = options or TokenizeOptions(**option_overrides)
    vocab = load_vocab(vocab)
    var = adata.raw.var if options.layer == "raw" else adata.var
    id_column = options.gene_id_column or ("ensembl_id" if "ensembl_id" in var.columns else None)
    ids = var.index if id_column is None else var[id_column].astype(object)
    plan = plan_genes(ids, vocab, sum_duplicates=options.sum_duplicates, min_mapped_fraction=options.min_mapped_fraction,
                      max_genes=options.max_genes,
                      source="adata", id_column=f"var[{id_column!r}]" if id_column else "var index")
    matrix = adata.raw.X if options.layer == "raw" else adata.X if options.layer in (None, "X") else adata.layers[options.layer]
    counts = sp.csr_matrix(matrix)
    problems = count_problems(counts, allow_non_integer=options.allow_non_integer)
    if {k for k in problems if k != "first"}:
        raise ValueError(f"adata: the count matrix is not raw counts: {format_problems(problems, adata.obs_names, ids)}")
    obs = adata.obs
    obs_columns = options.resolve_obs_columns(list(obs.columns), "adata")
    table, _ = encode_cells(
        counts,
        n_counts=obs[options.count_column].to_numpy() if options.count_column in obs.columns else None,
        keep=(obs[options.filter_column].to_numpy() == 1) if options.filter_column in obs.columns else None,
        cell_ids=(obs[options.cell_id_column] if options.cell_id_column else obs.index).to_numpy(dtype=object),
        metadata={dst: obs[src].to_numpy(dtype=object if obs[src].dtype.name == "category" else None)
                  for src, dst in obs_columns.items()},
        plan=plan, keep_counts=options.keep_counts,
    )
    return table


def format_problems(problems: dict, cell_names, gene_names) -> str:
    kinds = ", ".join(f"{v:,} {k} values" for k, v in problems.items() if k != "first")
    row, col, value = problems["first"]
    return (f"{kinds} (first: {value!r} at cell {cell_names[row]!r}, gene {gene_names[col]!r}); "
            "pass raw integer counts (e.g. layer='counts' or 'raw'), or allow_non_integer=True "
            "(--allow-non-integer) if non-integer counts are intended")
