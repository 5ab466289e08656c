"""What gene frequencies alone reach (the floors a pretraining run is read against), cells cut to their top
genes at tokenization, and the prediction head started at the gene frequencies."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PBMC3K

from geneformer_ray.data.corpus import shard_paths
from geneformer_ray.api import tokenize
from geneformer_ray.data.tokenize import format_summary
from geneformer_ray.data.vocab import load_vocab
from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.train.floors import RANK_BUCKETS, SMOOTHING, UNSEEN, frequency_floors


def _cells(corpus) -> tuple[list[list[int]], list[str]]:
    tables = [pq.read_table(p, columns=["input_ids", "pretrain_split"]).to_pydict() for p in shard_paths(corpus)]
    return [c for t in tables for c in t["input_ids"]], [s for t in tables for s in t["pretrain_split"]]


def test_floors_match_a_cell_by_cell_count_on_real_cells(pbmc3k_v1_corpus):
    vocab = load_vocab("gc30M")
    floors = frequency_floors(pbmc3k_v1_corpus, vocab)
    cells, split = _cells(pbmc3k_v1_corpus)
    train = [c for c, s in zip(cells, split) if s == "train"]
    val = [c for c, s in zip(cells, split) if s == "val"]
    assert (floors["train_cells"], floors["val_cells"]) == (len(train), len(val))
    # the same estimators written the slow way: a Counter per rank bucket, scored gene by gene
    total = Counter(g for c in train for g in c)
    genes = [t for name, t in vocab.token_ids.items() if name not in vocab.special_token_ids]
    norm = sum(total.values()) + UNSEEN * len(genes)
    p = {g: (total[g] + UNSEEN) / norm for g in genes}
    buckets = [Counter() for _ in range(RANK_BUCKETS)]
    for c in train:
        for r, g in enumerate(c):
            buckets[r * RANK_BUCKETS // len(c)][g] += 1
    unigram, rank = [], []
    for c in val:
        for r, g in enumerate(c):
            b = buckets[r * RANK_BUCKETS // len(c)]
            unigram.append(-np.log(p[g]))
            rank.append(-np.log((b[g] + SMOOTHING * p[g]) / (sum(b.values()) + SMOOTHING)))
    assert floors["unigram"] == pytest.approx(np.mean(unigram), abs=1e-9)
    assert floors["rank"] == pytest.approx(np.mean(rank), abs=1e-9)
    assert floors["val_genes"] == len(unigram)
    # PBMC3k: gene frequencies alone ~8.4 nats; the rank of a gene in its cell is worth most of a nat more
    assert 8.0 < floors["unigram"] < 9.0 and floors["rank"] < floors["unigram"] - 0.5
    # the head's starting bias is a distribution over the genes, special tokens all but excluded
    log_f = floors["log_frequencies"]
    assert np.exp(log_f[genes]).sum() == pytest.approx(1.0)
    assert all(np.exp(log_f[t]) < 1e-8 for t in vocab.special_token_ids.values())


def test_tokenize_keeps_each_cells_top_genes(pbmc3k_v1_corpus, tmp_path):
    manifest = tokenize(PBMC3K, tmp_path / "top64", vocab="gc30M", max_genes=64, progress=False).manifest
    cut, _ = _cells(tmp_path / "top64")
    full, _ = _cells(pbmc3k_v1_corpus)
    assert cut == [c[:64] for c in full]  # the same ranking, cut: not a different encoding
    assert manifest["settings"]["max_genes"] == 64
    assert manifest["summary"]["cells_at_input_size"] == sum(len(c) >= 64 for c in full)
    assert "truncated at their top 64 genes (max_genes)" in format_summary(manifest)
    histogram = format_summary(manifest).split("cell length (tokens):")[1].split()
    assert histogram[-3:-1] == ["1-64", f"{manifest['num_cells']:,}"]  # ends at the cut, not at 2,048
    with pytest.raises(ValueError, match="max_genes=0 must be at least 1"):
        tokenize(PBMC3K, tmp_path / "none", vocab="gc30M", max_genes=0, progress=False)
    assert not (tmp_path / "none").exists()


def test_output_bias_is_for_new_models_only(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.output_bias=gene_frequency sets up a new model"):
        PretrainConfig(data={"corpus": str(tmp_path)}, model={"init_from": str(tmp_path / "model"),
                                                               "output_bias": "gene_frequency"})
    with pytest.raises(ValueError, match="model.output_bias='unigram': use zero or gene_frequency"):
        PretrainConfig(data={"corpus": str(tmp_path)}, model={"output_bias": "unigram"})
