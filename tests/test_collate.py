"""Ring 1: masking statistics, specials never masked, length grouping, token budgets, padding."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from geneformer_ray.train.collate import GeneMasker, length_grouped_batches, pad_cells, padding_fraction
from geneformer_ray.data.vocab import load_vocab

from conftest import REFERENCE


@pytest.fixture(scope="module")
def v2_cells():
    return [np.asarray(c) for c in pq.read_table(REFERENCE / "pbmc3k_V2.parquet")["input_ids"].to_pylist()]


def test_masking_rates_over_many_batches(v2_cells):
    vocab = load_vocab("gc104M")
    masker = GeneMasker.for_vocab(vocab, seed=0)
    rng = np.random.default_rng(1)
    counts = dict(genes=0, selected=0, masked=0, random=0, kept=0, special_selected=0)
    for _ in range(40):
        batch = [v2_cells[i] for i in rng.integers(0, len(v2_cells), 12)]
        ids, attention = pad_cells(batch, pad_id=vocab.pad_id)
        masked, labels = masker(ids)
        special = np.isin(ids, list(vocab.special_token_ids.values()))
        sel = labels != -100
        counts["genes"] += int((~special).sum())
        counts["selected"] += int(sel.sum())
        counts["special_selected"] += int((sel & special).sum())
        counts["masked"] += int((masked[sel] == vocab.mask_id).sum())
        counts["kept"] += int((masked[sel] == ids[sel]).sum())
        counts["random"] += int(((masked[sel] != ids[sel]) & (masked[sel] != vocab.mask_id)).sum())
        assert (labels[sel] == ids[sel]).all()
        assert (masked[~sel] == ids[~sel]).all()  # nothing else changes
        assert not np.isin(masked[sel & (masked != ids) & (masked != vocab.mask_id)], list(vocab.special_token_ids.values())).any()
    assert counts["special_selected"] == 0
    assert abs(counts["selected"] / counts["genes"] - 0.15) < 0.005
    for key, share in (("masked", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(counts[key] / counts["selected"] - share) < 0.01, key


def test_masker_state_round_trips():
    masker = GeneMasker.for_vocab(load_vocab("gc30M"), seed=3)
    ids = np.arange(2, 402).reshape(4, 100)
    state = masker.state_dict()
    first = masker(ids)
    masker.load_state_dict(state)
    again = masker(ids)
    assert all((a == b).all() for a, b in zip(first, again))


def test_length_grouping_pads_far_less_than_random_batches(v2_cells):
    lengths = np.array([len(c) for c in v2_cells])
    rng = np.random.default_rng(0)
    order = rng.permutation(lengths.size)
    grouped = [order[b] for b in length_grouped_batches(lengths[order], rng, batch_size=12, window_batches=64)]
    random = [order[i : i + 12] for i in range(0, lengths.size, 12)]
    assert sorted(np.concatenate(grouped).tolist()) == list(range(lengths.size))  # every cell exactly once
    grouped_pad, random_pad = padding_fraction(grouped, lengths), padding_fraction(random, lengths)
    assert grouped_pad < 0.05 and random_pad > 0.3 and grouped_pad < random_pad / 6


def test_token_budget_batches(v2_cells):
    lengths = np.array([len(c) for c in v2_cells])
    batches = length_grouped_batches(lengths, np.random.default_rng(0), max_tokens=8192)
    assert all(lengths[b].max() * b.size <= 8192 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(lengths.size))
    with pytest.raises(ValueError, match="below the longest cell"):
        length_grouped_batches(lengths, np.random.default_rng(0), max_tokens=100)
    with pytest.raises(ValueError, match="exactly one"):
        length_grouped_batches(lengths, np.random.default_rng(0))


def test_padding_to_the_longest_cell():
    ids, attention = pad_cells([np.array([2, 5, 6, 3]), np.array([2, 7, 3])], pad_id=0)
    assert ids.tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_padding_to_a_multiple_bounds_the_shapes_and_respects_the_model_width():
    cells = [np.arange(2, 2 + n) for n in (70, 3)]
    ids, attention = pad_cells(cells, pad_id=0, multiple=64)
    assert ids.shape == (2, 128) and attention.sum() == 73  # the padding is masked out
    assert ids[0, :70].tolist() == cells[0].tolist() and not ids[0, 70:].any()
    assert pad_cells(cells, multiple=64, max_width=100)[0].shape == (2, 100)  # never past the model's positions
    assert pad_cells(cells, multiple=64, max_width=50)[0].shape == (2, 70)  # nor shorter than a cell
    widths = {pad_cells([np.ones(n, dtype=np.int64)], multiple=64)[0].shape[1] for n in range(1, 2049)}
    assert widths == set(range(64, 2049, 64))  # 32 shapes for every length up to 2,048
