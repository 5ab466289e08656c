"""Exactly-once pretraining epochs: which cells each rank reads, and how far the group has got.

    data = EpochData.start(corpus, manifest, seed=0)             # or EpochData.restore(state, ...)
    for batch in data.rank_batches(rank, world, batch_size=12, ...):   # padded, length-grouped, with cell numbers
        ...                                                      # train on it, then
        data.consumed_by_step(batch["cell_index"])               # the cells this rank used in the step
    data.sync(ranks)                                             # every rank's cells into the shared record
    state = data.state_dict()                                    # goes into the checkpoint

Why not Ray Data's streaming split here: it decides while running which worker gets which block and
keeps no position, so a restarted run can only begin the epoch again (replaying its first part, and
running out of steps before its last cells). Pretraining epochs are days long at Genecorpus scale, so
each rank instead reads its own share of the shards straight from parquet, following a plan that every
rank computes alike from the manifest, the epoch's seed and the record of consumed cells:

- The epoch's shard order is a permutation seeded by (seed, epoch). Along it, the cells not yet
  consumed (training cells only, ``pretrain_split`` = 'train') are cut into ``world`` runs of equal
  length; rank r reads run r (a few shard segments). Equal cell counts per rank; ranks that run out of
  batches first join the remaining steps with zero-weight batches, so no cell is dropped at the end.
- The record is one bit per corpus cell (a cell's number is its shard's ``first_cell`` + its row):
  a cell is marked only when the optimizer step that used it is part of a checkpoint. A run resumed
  from that checkpoint, on any number of workers, plans the epoch's remaining cells and nothing else.
- Within a rank, segments are read a buffer at a time (``shuffle_buffer`` cells at least, the next
  one prefetched in a thread), shuffled, and cut into length-grouped batches (Geneformer's recipe).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geneformer_ray.data.corpus import SPLIT_COLUMN
from geneformer_ray.train.collate import cell_batches

STATE_VERSION = 1
READ_COLUMNS = ["input_ids", "length"]


@dataclass(frozen=True)
class Segment:
    """Training cells [lo, hi) of one shard, counted among its cells not yet consumed this epoch."""

    shard: int
    lo: int
    hi: int


def shard_order(num_shards: int, *, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def plan_epoch(manifest: dict, consumed: np.ndarray, *, seed: int, epoch: int, world: int) -> list[list[Segment]]:
    """Every rank's segments: the epoch's unconsumed training cells along the seeded shard order, cut
    into ``world`` runs of equal length. Needs only the manifest and the record (no data read)."""
    shards = manifest["shards"]
    remaining = []
    for i in shard_order(len(shards), seed=seed, epoch=epoch):
        s = shards[i]
        done = int(consumed[s["first_cell"]: s["first_cell"] + s["num_cells"]].sum())
        remaining.append((int(i), s["num_cells"] - s["num_val"] - done))
    total = sum(n for _, n in remaining)
    bounds = [total * r // world for r in range(world + 1)]
    plans: list[list[Segment]] = [[] for _ in range(world)]
    start = 0  # position of the current shard's first remaining cell along the epoch
    for shard, n in remaining:
        for r in range(world):
            lo, hi = max(bounds[r], start), min(bounds[r + 1], start + n)
            if lo < hi:
                plans[r].append(Segment(shard, lo - start, hi - start))
        start += n
    return plans


def plan_validation(manifest: dict, *, rank: int, world: int, cells: int) -> list[int]:
    """The shards a rank reads validation cells from: the first shards, in corpus order, whose
    validation cells add up to ``cells`` for every rank (each rank keeps every world-th one)."""
    needed, chosen = cells * world, []
    for i, s in enumerate(manifest["shards"]):
        if needed <= 0:
            break
        if s["num_val"]:
            chosen.append(i)
            needed -= s["num_val"]
    return chosen


@dataclass
class EpochData:
    """Where the worker group stands in the epoch: the epoch number and the record of consumed cells
    (the same on every rank after ``sync``), plus this rank's cells used since the last sync."""

    corpus: Path
    manifest: dict
    seed: int
    epoch: int = 0
    consumed: np.ndarray = None  # bool per corpus cell
    pending: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.corpus = Path(self.corpus)
        if self.consumed is None:
            self.consumed = np.zeros(self.manifest["num_cells"], dtype=bool)

    @property
    def num_train(self) -> int:
        return self.manifest["split"]["num_train"]

    # -- the record -------------------------------------------------------------------------------
    def consumed_by_step(self, cell_index: np.ndarray) -> None:
        self.pending.append(np.asarray(cell_index, dtype=np.int64))

    def sync(self, ranks) -> int:
        """Merge every rank's pending cells into the record (a collective: all ranks call it together);
        returns how many cells of this epoch are consumed. Refuses a cell consumed twice."""
        mine = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.int64)
        self.pending = []
        merged = np.concatenate(ranks.gather(mine))
        if merged.size and (self.consumed[merged].any() or np.unique(merged).size != merged.size):
            raise RuntimeError(f"epoch {self.epoch}: a cell was consumed twice; the data plan is broken")
        self.consumed[merged] = True
        return int(self.consumed.sum())

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed[:] = False
        self.pending = []

    def state_dict(self) -> dict:
        """What the checkpoint carries (call ``sync`` first): the epoch and the packed record."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "num_cells": int(self.consumed.size),
                "consumed": np.packbits(self.consumed)}

    @classmethod
    def restore(cls, state: dict, *, corpus: Path, manifest: dict, seed: int) -> "EpochData":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["num_cells"] != manifest["num_cells"]:
            raise ValueError(f"the checkpoint's data position covers {state['num_cells']:,} cells but {corpus} has "
                             f"{manifest['num_cells']:,}; resume with the corpus the run started with")
        consumed = np.unpackbits(np.asarray(state["consumed"], dtype=np.uint8), count=state["num_cells"]).astype(bool)
        return cls(corpus=corpus, manifest=manifest, seed=seed, epoch=int(state["epoch"]), consumed=consumed)

    # -- reading --------------------------------------------------------------------------------
    def rank_batches(self, rank: int, world: int, *, pad_id: int, batch_size: int | None, max_tokens: int | None,
                     window_batches: int, shuffle_buffer: int, pad_to_multiple: int = 1, max_width: int | None = None,
                     packing: bool = False):
        """This rank's batches of the epoch's unconsumed training cells (``collate.cell_batches``: padded and
        length-grouped, or packed rows), each with its "cell_index" (numpy). Call after ``sync`` (the plan
        reads the record)."""
        plan = plan_epoch(self.manifest, self.consumed, seed=self.seed, epoch=self.epoch, world=world)[rank]
        rng = np.random.default_rng([self.seed, self.epoch, rank, int(self.consumed.sum())])
        buffers = _buffers(lambda seg: self._read_segment(seg), plan, min_cells=max(1, shuffle_buffer))
        for cells, lengths, index in buffers:
            order = rng.permutation(lengths.size)
            cells, lengths, index = cells[order], lengths[order], index[order]
            for batch, rows in cell_batches(cells, lengths, rng, pad_id=pad_id, batch_size=batch_size,
                                            max_tokens=max_tokens, window_batches=window_batches, packing=packing,
                                            pad_to_multiple=pad_to_multiple, max_width=max_width):
                yield {**batch, "cell_index": index[rows]}

    def _read_segment(self, seg: Segment):
        """(cells, lengths, cell numbers) of one segment: its training cells not yet consumed, in file order;
        only the row groups that hold them are decoded."""
        s = self.manifest["shards"][seg.shard]
        parquet = pq.ParquetFile(self.corpus / s["path"])
        rows = np.flatnonzero(_in_split(parquet, "train") & ~self.consumed[s["first_cell"]: s["first_cell"] + s["num_cells"]])[seg.lo: seg.hi]
        return _read_rows(parquet, rows, first_cell=s["first_cell"])

    def validation_cells(self, rank: int, world: int, *, cells: int):
        """Up to ``cells`` validation cells for this rank (the same ones at every pass and in every run)."""
        picked = []
        for shard in plan_validation(self.manifest, rank=rank, world=world, cells=cells):
            s = self.manifest["shards"][shard]
            parquet = pq.ParquetFile(self.corpus / s["path"])
            rows = np.flatnonzero(_in_split(parquet, "val"))
            picked.append(_read_rows(parquet, rows, first_cell=s["first_cell"]))
        if not picked:
            return np.array([], dtype=object), np.zeros(0, dtype=np.int64)
        cells_all = np.concatenate([p[0] for p in picked])[rank::world][:cells]
        lengths = np.concatenate([p[1] for p in picked])[rank::world][:cells]
        return cells_all, lengths


def _in_split(parquet: pq.ParquetFile, name: str) -> np.ndarray:
    split = parquet.read(columns=[SPLIT_COLUMN])[SPLIT_COLUMN]
    return pc.equal(split.cast(pa.string()), name).to_numpy(zero_copy_only=False)


def _read_rows(parquet: pq.ParquetFile, rows: np.ndarray, *, first_cell: int):
    if not rows.size:
        return np.array([], dtype=object), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    groups = list(range(int(np.searchsorted(starts, rows[0], side="right")) - 1,
                        int(np.searchsorted(starts, rows[-1], side="right"))))
    table = parquet.read_row_groups(groups, columns=READ_COLUMNS)
    local = rows - starts[groups[0]]
    ids = table["input_ids"].combine_chunks()
    offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
    cells = np.empty(local.size, dtype=object)
    for k, r in enumerate(local):
        cells[k] = values[offsets[r]: offsets[r + 1]]
    lengths = table["length"].to_numpy()[local].astype(np.int64)
    return cells, lengths, rows.astype(np.int64) + first_cell


def _buffers(read, plan: list[Segment], *, min_cells: int):
    """Concatenated segments of at least ``min_cells`` cells (the last may be smaller); the next segment
    is read in a background thread while the current buffer is trained on."""
    if not plan:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-data") as pool:
        ahead = pool.submit(read, plan[0])
        parts, size = [], 0
        for i in range(len(plan)):
            part = ahead.result()
            if i + 1 < len(plan):
                ahead = pool.submit(read, plan[i + 1])
            parts.append(part)
            size += part[1].size
            if size >= min_cells or i + 1 == len(plan):
                yield tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
                parts, size = [], 0
