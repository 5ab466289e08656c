"""Batches for masked gene prediction: length grouping, dynamic padding, MLM masking.

    batches = length_grouped_batches(lengths, rng, batch_size=12, window_batches=64)
    masker = GeneMasker.for_vocab(vocab, seed=0)
    input_ids, attention_mask = pad_cells([cells[i] for i in batch], pad_id=0)
    input_ids, labels = masker(input_ids)

Geneformer's recipe: cells of similar length are batched together (a window of many batches is
sorted by length, cut into batches, and the batch order shuffled), each batch is padded to its
longest cell, and 15% of gene tokens are selected (80% -> <mask>, 10% -> a random gene, 10% kept);
<pad>, <cls> and <eos> are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # label of positions that do not count in the loss


def length_grouped_batches(lengths: np.ndarray, rng: np.random.Generator, *, batch_size: int | None = None,
                           max_tokens: int | None = None, window_batches: int = 64) -> list[np.ndarray]:
    """Indices of batches of similar-length cells.

    Either ``batch_size`` cells per batch, or as many cells as fit ``max_tokens`` padded tokens
    (longest cell x number of cells). Cells are taken ``window_batches`` batches at a time in the
    order given (already shuffled upstream), sorted by length within the window, cut into batches;
    the batch order over the whole input is shuffled.
    """
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of batch_size and max_tokens")
    lengths = np.asarray(lengths)
    if max_tokens is not None and lengths.size and lengths.max() > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is below the longest cell ({lengths.max()} tokens); raise it")
    window = window_batches * (batch_size or max(1, max_tokens // max(1, int(np.median(lengths)) if lengths.size else 1)))
    batches: list[np.ndarray] = []
    for start in range(0, lengths.size, window):
        idx = np.arange(start, min(lengths.size, start + window))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]  # longest first
        if batch_size is not None:
            batches += [idx[i : i + batch_size] for i in range(0, idx.size, batch_size)]
        else:
            batches += _token_budget_cut(idx, lengths, max_tokens)
    rng.shuffle(batches)
    return batches


def _token_budget_cut(idx: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    out, begin = [], 0
    while begin < idx.size:
        longest = lengths[idx[begin]]  # sorted descending: the first cell is the longest
        n = max(1, max_tokens // longest)
        out.append(idx[begin : begin + n])
        begin += n
    return out


def pad_cells(cells: list[np.ndarray], *, pad_id: int = 0, multiple: int = 1,
              max_width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(batch, width) int64 token ids padded with ``pad_id``, and the attention mask; width is the
    longest cell rounded up to ``multiple`` (at most ``max_width``)."""
    longest = max(len(c) for c in cells)
    width = -(-longest // multiple) * multiple
    if max_width is not None:
        width = max(min(width, max_width), longest)
    input_ids = np.full((len(cells), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(cells), width), dtype=np.int64)
    for row, cell in enumerate(cells):
        input_ids[row, : len(cell)] = cell
        attention_mask[row, : len(cell)] = 1
    return input_ids, attention_mask


def packed_batches(lengths: np.ndarray, *, batch_size: int | None = None, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices of batches for packed rows, in the order given (already shuffled upstream): ``batch_size``
    cells per batch, or as many cells as fit ``max_tokens`` real tokens (no padding to pay for, so no length
    grouping: every batch is a random draw of cells)."""
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of batch_size and max_tokens")
    lengths = np.asarray(lengths)
    if batch_size is not None:
        return [np.arange(i, min(i + batch_size, lengths.size)) for i in range(0, lengths.size, batch_size)]
    if lengths.size and lengths.max() > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is below the longest cell ({lengths.max()} tokens); raise it")
    batches, begin, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total + n > max_tokens:
            batches.append(np.arange(begin, i))
            begin, total = i, 0
        total += n
    if begin < lengths.size:
        batches.append(np.arange(begin, lengths.size))
    return batches


def pack_cells(cells: list[np.ndarray], *, pad_id: int = 0, multiple: int = 1) -> dict:
    """One packed row: {"input_ids": (1, tokens), "position_ids": (1, tokens) restarting at 0 for each cell,
    "attention_mask": (1, tokens) 1 on real tokens, "cu_seqlens": (segments + 1,) int32 offsets, "num_cells"}.
    The row is rounded up to ``multiple`` tokens (a bounded set of shapes on GPU/NPU); the padding tail is a
    segment of its own, so every token belongs to one and attention never mixes it with a cell."""
    lengths = np.array([len(c) for c in cells], dtype=np.int64)
    real = int(lengths.sum())
    width = -(-real // multiple) * multiple
    tail = width - real
    segments = np.append(lengths, tail) if tail else lengths
    offsets = np.zeros(segments.size + 1, dtype=np.int32)
    np.cumsum(segments, out=offsets[1:])
    input_ids = np.full(width, pad_id, dtype=np.int64)
    input_ids[:real] = np.concatenate(cells) if cells else []
    starts = np.repeat(offsets[:-1].astype(np.int64), segments)
    position_ids = np.arange(width, dtype=np.int64) - starts
    attention_mask = np.zeros(width, dtype=np.int64)
    attention_mask[:real] = 1
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "attention_mask": attention_mask[None],
            "cu_seqlens": offsets, "num_cells": len(cells)}


def cell_batches(cells, lengths: np.ndarray, rng: np.random.Generator, *, pad_id: int, batch_size: int | None,
                 max_tokens: int | None, window_batches: int, packing: bool = False, pad_to_multiple: int = 1,
                 max_width: int | None = None):
    """(batch, rows) over a set of cells: a packed row of cells in the given order (``pack_cells``), or a
    padded, length-grouped batch (``pad_cells``: {"input_ids", "attention_mask"}); ``rows`` index ``cells``."""
    if packing:
        for rows in packed_batches(lengths, batch_size=batch_size, max_tokens=max_tokens):
            yield pack_cells([cells[i] for i in rows], pad_id=pad_id, multiple=pad_to_multiple), rows
        return
    for rows in length_grouped_batches(lengths, rng, batch_size=batch_size, max_tokens=max_tokens,
                                       window_batches=window_batches):
        input_ids, attention_mask = pad_cells([cells[i] for i in rows], pad_id=pad_id, multiple=pad_to_multiple,
                                              max_width=max_width)
        yield {"input_ids": input_ids, "attention_mask": attention_mask}, rows


@dataclass
class GeneMasker:
    """BERT-style masking restricted to gene tokens."""

    mask_id: int
    special_ids: np.ndarray  # never selected: <pad>, <mask>, <cls>, <eos>
    gene_ids: np.ndarray  # replacement tokens for the "random" 10%
    rng: np.random.Generator
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    @classmethod
    def for_vocab(cls, vocab, *, seed: int | None = None, mlm_probability: float = 0.15) -> "GeneMasker":
        special = np.array(sorted(vocab.special_token_ids.values()), dtype=np.int64)
        genes = np.array(sorted(vocab.token_ids[g] for g in vocab.gene_tokens), dtype=np.int64)
        return cls(mask_id=vocab.mask_id, special_ids=special, gene_ids=genes, rng=np.random.default_rng(seed),
                   mlm_probability=mlm_probability)

    def __call__(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (masked input ids, labels); labels are -100 except at selected positions."""
        is_gene = ~np.isin(input_ids, self.special_ids)  # (batch, seq)
        selected = is_gene & (self.rng.random(input_ids.shape) < self.mlm_probability)
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        draw = self.rng.random(input_ids.shape)
        to_mask = selected & (draw < self.mask_fraction)
        to_random = selected & (draw >= self.mask_fraction) & (draw < self.mask_fraction + self.random_fraction)
        masked = input_ids.copy()
        masked[to_mask] = self.mask_id
        masked[to_random] = self.gene_ids[self.rng.integers(0, self.gene_ids.size, int(to_random.sum()))]
        return masked, labels

    def state_dict(self) -> dict:
        return {"version": 1, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"masker state version {state.get('version')} is not 1")
        self.rng.bit_generator.state = state["rng"]


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """Share of padded positions over all positions when each batch is padded to its longest cell."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * b.size for b in batches)
    return 1.0 - real / total if total else 0.0


def iter_padded_batches(shard, *, pad_id: int, batch_size: int | None = None, max_tokens: int | None = None,
                        window_batches: int = 64, shuffle_buffer: int = 0, seed: int = 0, columns: list[str] = (),
                        keep=None, pad_to_multiple: int = 1, max_width: int | None = None):
    """Padded, length-grouped batches (numpy) from a Ray Data shard or dataset of a corpus.

    Yields {"input_ids": (batch, longest), "attention_mask": (batch, longest), column: (batch, ...)}.
    The shard is read ``window_batches`` batches at a time (rows shuffled through a local buffer of
    ``shuffle_buffer`` rows when > 0, seeded), each window cut into length-grouped batches in
    shuffled order. ``keep(cell_ids) -> bool mask`` selects rows first (e.g. one rank's stripe).
    ``pad_to_multiple`` rounds each batch's width up (a bounded set of shapes on GPU/NPU, see
    ``accelerators.pad_multiple``), never past ``max_width`` (the model's positions).
    """
    rng = np.random.default_rng(seed)
    window_rows = window_batches * (batch_size or max(1, max_tokens // 1024))
    for window in shard.iter_batches(batch_size=window_rows, batch_format="numpy", prefetch_batches=1,
                                     local_shuffle_buffer_size=shuffle_buffer or None,
                                     local_shuffle_seed=seed if shuffle_buffer else None):
        if keep is not None:
            mask = keep(window["cell_id"])
            window = {k: v[mask] for k, v in window.items()}
        cells, lengths = window["input_ids"], np.asarray(window["length"])
        if not lengths.size:
            continue
        for batch in length_grouped_batches(lengths, rng, batch_size=batch_size, max_tokens=max_tokens,
                                            window_batches=lengths.size):
            input_ids, attention_mask = pad_cells([cells[i] for i in batch], pad_id=pad_id, multiple=pad_to_multiple,
                                                  max_width=max_width)
            yield {"input_ids": input_ids, "attention_mask": attention_mask, **{c: window[c][batch] for c in columns}}
