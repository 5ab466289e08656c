"""A fine-tuning worker's data: each split's batches on this rank, and the predictions of a split gathered
from every rank.

    splits = SplitBatches(cfg, "cell", {}, plan, vocab, ranks, max_width=2048, memory=refs)
    for batch in splits.training(epoch): ...                    # length-grouped, shuffled, padded
    result = predict_split(model, splits, loss_fn, "val", plan=plan, device=device, ranks=ranks)
"""

from __future__ import annotations

import zlib

import numpy as np
import ray.train
import torch

from geneformer_ray.runtime import autocast, pad_multiple
from geneformer_ray.train.collate import IGNORE_INDEX as IGNORE
from geneformer_ray.train.collate import iter_padded_batches
from geneformer_ray.train.common import Ranks, to_device
from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.train.loss import TaskLoss

EVAL_CACHE_CELLS = 10_000  # per rank: a validation stripe up to this size is read once per run
MEMORY_TOKENS = 20_000_000  # data.loader=auto: a run whose splits hold this many tokens or fewer is kept in memory


class SplitBatches:
    """This rank's padded, length-grouped batches of each split of a fine-tuning run: training batches
    shuffled anew every epoch; evaluation batches from the rank's stripe of the split (a stable hash of the
    cell id, so every cell is predicted once), kept in memory after the first pass when small, since
    validation runs many times and each new Ray Data pass costs seconds of start-up. ``memory``: the
    splits' rows in the object store (``ray.put`` of ``split_rows``), read instead of Ray Data shards."""

    def __init__(self, cfg: FinetuneConfig, task_kind: str, token_classes: dict, plan, vocab, ranks: Ranks, *,
                 max_width: int, memory: dict | None = None):
        self.cfg, self.kind, self.ranks, self.max_width = cfg, task_kind, ranks, max_width
        self.pad_id, self.pad_multiple = vocab.pad_id, pad_multiple(plan, cfg.data.pad_to_multiple)
        self.token_labels = {name: _token_lookup(lookup, vocab.num_tokens) for name, lookup in token_classes.items()}
        self.cached: dict[str, list[dict]] = {}
        self.memory = {name: ray.get(ref) for name, ref in (memory or {}).items()}

    def training(self, epoch: int):
        return self._batches("train", epoch, training=True)

    def evaluation(self, name: str):
        if name in self.cached:
            yield from self.cached[name]
            return
        kept, cells = [], 0
        for batch in self._batches(name, 0, training=False):
            cells += len(batch["input_ids"])
            kept = kept if kept is not None and cells <= EVAL_CACHE_CELLS else None
            if kept is not None:
                kept.append(batch)
            yield batch
        if kept is not None:
            self.cached[name] = kept

    def _batches(self, name: str, epoch: int, *, training: bool):
        data, ranks = self.cfg.data, self.ranks
        seed = self.cfg.train.seed * 1000 + epoch
        shard = ray.train.get_dataset_shard(name) if name not in self.memory else \
            MemorySplit(self.memory[name], ranks.rank, ranks.world, seed=seed if training else None)
        for batch in iter_padded_batches(
                shard, pad_id=self.pad_id, batch_size=data.batch_size,
                window_batches=data.window_batches, shuffle_buffer=data.shuffle_buffer if training else 0, seed=seed, columns=["cell_id"] + ([] if self.kind == "gene" else ["labels"]),
                pad_to_multiple=self.pad_multiple, max_width=self.max_width,
                keep=None if training else (lambda ids: _stripe(ids, ranks.rank, ranks.world))):
            if self.kind == "gene":
                batch["labels"] = self.token_labels[name][batch["input_ids"]]  # (batch, seq): -100 except labelled genes
            yield batch


class MemorySplit:
    """One split's rows (numpy columns, as ``split_rows`` builds them) read like a Ray Data shard by
    ``iter_padded_batches``. Training (``seed`` given): the rows in a fresh seeded order every epoch, dealt
    to the ranks in turn (disjoint, equal counts within one cell); evaluation: every row (the caller keeps
    the rank's stripe)."""

    def __init__(self, rows: dict, rank: int, world: int, *, seed: int | None):
        self.rows, self.rank, self.world, self.seed = rows, rank, world, seed

    def iter_batches(self, *, batch_size: int, **_):
        order = np.arange(len(self.rows["cell_id"]))
        if self.seed is not None:
            order = np.random.default_rng([self.seed, 0x5917]).permutation(order.size)[self.rank :: self.world]
        for start in range(0, order.size, batch_size):
            rows = order[start : start + batch_size]
            yield {k: v[rows] for k, v in self.rows.items()}


def split_rows(corpus_rows: dict, labels: dict) -> dict:
    """The corpus rows (numpy columns input_ids, length, cell_id) of one split's cells, with their labels
    (an int, or a row of ints for multitask): what ``MemorySplit`` reads, and what Ray Data's
    ``map_batches`` adds to each streamed block."""
    keep = np.fromiter((c in labels for c in corpus_rows["cell_id"]), dtype=bool, count=len(corpus_rows["cell_id"]))
    rows = {k: v[keep] for k, v in corpus_rows.items()}
    shape = np.shape(next(iter(labels.values()))) if labels else ()
    rows["labels"] = np.array([labels[c] for c in rows["cell_id"]], dtype=np.int64).reshape(-1, *shape)
    return rows


def predict_split(model, splits: SplitBatches, loss_fn: TaskLoss, name: str, *, plan, device, ranks: Ranks) -> dict:
    """Every rank predicts its stripe of the split; all ranks get every prediction (ids, true, probs, tokens)."""
    model.eval()
    ids, true, probs, tokens = [], [], [], []
    with torch.no_grad():
        for batch in splits.evaluation(name):
            with autocast(plan, device):
                outputs = model(**to_device(batch, device, keys=("input_ids", "attention_mask")))
            record = loss_fn.predictions(outputs, batch)
            ids += record["ids"]
            true.append(record["true"])
            probs.append(record["probs"])
            tokens.append(record.get("tokens", np.zeros(0, dtype=np.int64)))
    model.train()
    parts = ranks.gather({"ids": ids, "true": _cat(true), "probs": _cat(probs), "tokens": _cat(tokens)})
    return {k: sum((p[k] for p in parts), []) if k == "ids" else _cat([p[k] for p in parts if len(p[k])]) for k in parts[0]}


def _stripe(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Evaluation rows of this rank: a stable hash of the cell id, so every cell is predicted once."""
    return np.array([zlib.crc32(str(i).encode()) % world == rank for i in ids], dtype=bool)


def _token_lookup(classes: dict, num_tokens: int) -> np.ndarray:
    lookup = np.full(num_tokens, IGNORE, dtype=np.int64)
    for token, label in classes.items():
        lookup[int(token)] = label
    return lookup


def _cat(parts: list) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)
