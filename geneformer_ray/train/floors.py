"""What gene frequencies alone reach at masked gene prediction: the floors a pretraining run's
validation loss is read against.

    floors = frequency_floors(corpus, manifest, vocab)
    floors["unigram"]   # nats: each gene's frequency in the training cells, scored on the validation cells
    floors["rank"]      # nats: each gene's frequency at its rank bucket (the same cells)

A model under the unigram floor knows more than how common genes are; under the rank floor, more than
how common they are at that place in a cell's ranking: only the cell's other genes can tell it that.
Masking picks gene positions uniformly, so the mean over every gene position of the validation cells
has the same expectation as the mean over masked positions that the validation loss takes.

The rank bucket is the gene's place in its cell relative to the cell's length (``RANK_BUCKETS`` equal
slices from the top); the bucket frequencies are shrunk toward the overall frequency by
``SMOOTHING`` pseudo-counts, so that genes rarely seen in a bucket keep a sensible probability. Of the
estimators tried on PBMC3k (absolute positions in slices of 16-256, 8-64 relative slices, 10-10,000
pseudo-counts) this one scored lowest, which makes it the hardest floor to beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geneformer_ray.data.corpus import SPLIT_COLUMN, shard_paths

RANK_BUCKETS = 16
SMOOTHING = 1000.0  # pseudo-counts of the overall frequency in each rank bucket
UNSEEN = 0.5  # pseudo-count of every gene token (genes no training cell has keep a finite loss)


def frequency_floors(corpus: str | Path, vocab, *, max_train_cells: int = 100_000, max_val_cells: int = 20_000) -> dict:
    """The two floors (nats) and the training cells' gene log-frequencies (``log_frequencies``: one per
    token id, what ``model.output_bias: gene_frequency`` starts the prediction head at). Reads up to
    ``max_train_cells`` / ``max_val_cells`` cells of each split, in shard order."""
    special = np.array(sorted(vocab.special_token_ids.values()), dtype=np.int64)
    size = vocab.num_tokens
    counts = np.zeros(size)
    by_rank = np.zeros(RANK_BUCKETS * size)
    val_tokens, val_buckets = [], []
    seen = {"train": 0, "val": 0}
    for path in shard_paths(corpus):
        if seen["train"] >= max_train_cells and seen["val"] >= max_val_cells:
            break
        table = pq.read_table(path, columns=["input_ids", SPLIT_COLUMN])
        split = pc.cast(table[SPLIT_COLUMN], pa.string()).to_numpy(zero_copy_only=False)
        for name, limit in (("train", max_train_cells), ("val", max_val_cells)):
            rows = np.flatnonzero(split == name)[: max(0, limit - seen[name])]
            if not rows.size:
                continue
            seen[name] += rows.size
            tokens, buckets = _genes_and_buckets(table["input_ids"].take(pa.array(rows)), special)
            if name == "train":
                counts += np.bincount(tokens, minlength=size)
                by_rank += np.bincount(buckets * size + tokens, minlength=RANK_BUCKETS * size)
            else:
                val_tokens.append(tokens)
                val_buckets.append(buckets)
    gene = np.ones(size, dtype=bool)
    gene[special] = False
    frequency = np.where(gene, counts + UNSEEN, 0.0)
    frequency /= frequency.sum()
    by_rank = by_rank.reshape(RANK_BUCKETS, size)
    at_rank = (by_rank + SMOOTHING * frequency) / (by_rank.sum(1, keepdims=True) + SMOOTHING)
    out = {"train_cells": seen["train"], "val_cells": seen["val"], "rank_buckets": RANK_BUCKETS,
           "log_frequencies": np.log(np.where(gene, frequency, 1.0 / size ** 2))}
    if val_tokens and seen["train"]:
        tokens, buckets = np.concatenate(val_tokens), np.concatenate(val_buckets)
        out["unigram"] = float(-np.log(frequency[tokens]).mean())
        out["rank"] = float(-np.log(at_rank[buckets, tokens]).mean())
        out["val_genes"] = int(tokens.size)
    return out


def _genes_and_buckets(cells: pa.ChunkedArray, special: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every gene token of the cells (special tokens left out) and its rank bucket in its cell."""
    ids = pa.concat_arrays(cells.chunks) if isinstance(cells, pa.ChunkedArray) else cells
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy().astype(np.int64)[offsets[0]: offsets[-1]]
    cell = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    is_gene = ~np.isin(values, special)
    values, cell = values[is_gene], cell[is_gene]
    genes_per_cell = np.bincount(cell, minlength=len(offsets) - 1)
    first = np.concatenate([[0], np.cumsum(genes_per_cell)[:-1]])
    rank = np.arange(values.size) - first[cell]  # 0 = the cell's top gene
    return values, rank * RANK_BUCKETS // genes_per_cell[cell]
