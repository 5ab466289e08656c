"""The model actor of in-silico perturbation: every perturbed copy of a block of cells through the model
once, in length-sorted sub-batches across cells, each copy measured against its cell's unperturbed states
(computed once per cell) as soon as it leaves the model, so nothing but one sub-batch's states is held.

Measures of one perturbed copy (``geneformer_ray.infer.perturb`` says which the statistics use):
  cosine       Geneformer's recorded value. Cell mode: the mean over the cell's remaining genes of
               cos(the gene's state after, the same gene's state before), the perturbed genes left out of
               both (its ``isp_perturb_*``: ``make_comparison_batch``, then the mean of the gene cosines).
               <cls> modes (``cls``, ``cls_and_gene``): cos(<cls> state after, before).
  shift        1 - cosine (> 0; larger = a bigger effect)
  cell_shift   1 - cos(mean of gene states after, mean before): this project's earlier measure
  shift_to_S   per cell state S (start, goal, alternatives): cos(cell after, S) - cos(cell before, S), the
               cell embedding being the gene-state mean (cell mode) or <cls> state; > 0 moves towards S
With ``cell_and_gene`` / ``cls_and_gene`` every compared gene's own cosine is also written, one row per (cell, perturbed,
affected gene), to ``gene_shifts/part-*.parquet``, a row group per sub-batch (never a run's table in memory).
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from geneformer_ray.files import atomic_file
from geneformer_ray.infer.encoder import CellEncoder, length_sorted_chunks, mean_pool
from geneformer_ray.train.collate import pad_cells
from geneformer_ray.infer.perturb_plan import (
    CLS_MODES,
    GENE_TABLE_MODES,
    ORIGINAL,
    Edit,
    cell_edits,
    comparison_mask,
    perturb_encoding,
)

GENE_SHIFT_SCHEMA = pa.schema([("cell_id", pa.string()), ("role", pa.string()), ("perturbed", pa.int32()),
                               ("affected", pa.int32()), ("cosine", pa.float32())])


def cell_seed(seed: int, cell_id: str) -> int:
    """The null genes' seed of one cell: the same cell draws the same genes in any block, on any actor."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()[:8], "little")


def part_name(cell_ids) -> str:
    """A block's part files are named by its cells: a retried block overwrites its own parts."""
    return hashlib.sha256("\n".join(sorted(cell_ids)).encode()).hexdigest()[:20]


class Perturber:
    """A model actor for ``Dataset.map_batches``: perturbs every cell of a block, writes the block's rows to
    ``shifts/part-<cells>.parquet`` (and ``gene_shifts/`` in cell-and-gene mode), atomically, and
    returns counts."""

    def __init__(self, model_dir: str, plan: dict, params: dict, out: str, batch_size: int,
                 states: dict[str, list[float]] | None = None, packing: bool = False):
        self.encoder = CellEncoder(model_dir, layer=params["layer"], plan=plan, packing=packing)
        self.params = params
        vocab = self.encoder.vocab
        self.targets = None if not params["genes"] else np.array([vocab.token_ids[g] for g in params["genes"]], np.int64)
        self.anchor = None if not params.get("anchor") else vocab.token_ids[params["anchor"]]
        self.out, self.batch_size = Path(out), batch_size
        self.cls_mode = params.get("emb_mode") in CLS_MODES
        self.gene_table = params.get("emb_mode") in GENE_TABLE_MODES
        device = self.encoder.device
        self.states = {label: torch.tensor(v, dtype=torch.float32, device=device) for label, v in (states or {}).items()}
        self.special = np.array(sorted(vocab.special_token_ids.values()), np.int64)
        self.cls_id, self.eos_id, self.max_genes = vocab.cls_id, vocab.eos_id, vocab.max_genes_per_cell

    # -- planning ------------------------------------------------------------------------------
    def _edits(self, ids: np.ndarray, cell_id: str) -> list[Edit]:
        genes = ids[~np.isin(ids, self.special)]
        rng = np.random.default_rng(cell_seed(self.params["seed"], cell_id))
        return cell_edits(genes, kind=self.params["perturbation"], targets=self.targets, group=self.params.get("group", False),
                          anchor=self.anchor, null_genes=self.params["null_genes"], rng=rng)

    def __call__(self, batch: dict) -> dict:
        cell_ids = [str(c) for c in batch["cell_id"]]
        cells = [np.asarray(ids, np.int64) for ids in batch["input_ids"]]
        copies, rows = [], []  # copies: (owner, tokens); rows: (owner, edit, copy index)
        self._roles, self._keys = {}, {}  # per copy: the role and gene of the edit that made it
        for owner, (cell_id, ids) in enumerate(zip(cell_ids, cells)):
            index: dict[tuple, int] = {}
            rows.append((owner, Edit("original", ORIGINAL, ()), -1))
            for edit in self._edits(ids, cell_id):
                if edit.tokens not in index:  # a null gene that is also a target is computed once
                    index[edit.tokens] = len(copies)
                    self._roles[len(copies)], self._keys[len(copies)] = edit.role, edit.gene_token
                    copies.append((owner, edit.tokens))
                rows.append((owner, edit, index[edit.tokens]))
        before = self._originals(cells)
        measures = self._measure(cells, copies, before, cell_ids, part_name(cell_ids) if cells else "")
        if cells:
            self._write_rows(cell_ids, rows, measures, before)
        return {"cells": np.array([len(cells)]), "perturbations": np.array([sum(r[1].role != "original" and r[1].role != "null"
                                                                                for r in rows)]),
                "forward_passes": np.array([len(copies) + len(cells)])}

    # -- the model -----------------------------------------------------------------------------
    def _originals(self, cells: list[np.ndarray]) -> dict:
        """Each cell's unperturbed token states, concatenated (cells' offsets kept), its cell embedding
        (gene mean, or <cls>) and its gene mean (for ``cell_shift``)."""
        states, cell_emb, gene_mean = [None] * len(cells), [None] * len(cells), [None] * len(cells)
        for chunk in length_sorted_chunks([len(c) for c in cells], self.batch_size):
            hidden, genes, _ = self.encoder.states([cells[i] for i in chunk])
            with torch.inference_mode():
                means = mean_pool(hidden, genes)
            for row, i in enumerate(chunk):
                states[i] = hidden[row, : len(cells[i])]
                gene_mean[i] = means[row]
                cell_emb[i] = hidden[row, 0] if self.cls_mode else means[row]
        if not cells:
            return {}
        lengths = torch.tensor([len(c) for c in cells])
        return {"states": torch.cat(states), "offsets": (torch.cumsum(lengths, 0) - lengths).to(self.encoder.device),
                "cell": torch.stack(cell_emb), "gene_mean": torch.stack(gene_mean)}

    def _measure(self, cells, copies, before, cell_ids, name) -> dict:
        """Every copy through the model in length-sorted sub-batches; per copy the measures of the module
        docstring (numpy arrays indexed like ``copies``)."""
        n = len(copies)
        result = {"cosine": np.ones(n), "cell_shift": np.zeros(n), **{f"shift_to_{s}": np.zeros(n) for s in self.states}}
        present = [set(c.tolist()) for c in cells]
        lengths = [self._encoded_length(cells[owner], present[owner], tokens) for owner, tokens in copies]
        deleted_at = self._single_deletions(cells, copies)
        sink = GeneShiftWriter(self.out / "gene_shifts" / f"part-{name}.parquet") if self.gene_table else None
        pending = []
        try:
            for chunk in length_sorted_chunks(lengths, self.batch_size):
                # encoded a sub-batch at a time: a block's copies (cells x genes of them) are never all in memory
                if deleted_at is not None:
                    input_ids, mask, source, compare = self._deletion_batch(cells, copies, chunk, deleted_at)
                else:
                    input_ids, mask, source, compare = self._encoded_batch(cells, copies, chunk)
                owners = self.encoder.to_device(np.array([copies[i][0] for i in chunk], np.int64))
                hidden, genes, ids = self.encoder.batch_states(input_ids, mask)
                with torch.inference_mode():
                    values = self._compare(hidden, genes, owners, self.encoder.to_device(source),
                                           self.encoder.to_device(compare), before)
                gene_cos = values.pop("gene_cos")
                pending.append((chunk, values))  # read back at the end: a read now would stall the device's queue
                if sink is not None:
                    self._write_gene_rows(sink, chunk, copies, cell_ids, ids, compare, gene_cos)
            for chunk, values in pending:
                for key, value in values.items():
                    result[key][chunk] = value.double().cpu().numpy()
        except BaseException:
            if sink is not None:
                sink.discard()
            raise
        if sink is not None:
            sink.commit()
        return result

    def _encoded_batch(self, cells, copies, chunk):
        """(batch, width) ids and mask of a sub-batch of copies, where each position came from (-1:
        inserted or padding) and which positions are compared: any perturbation, one copy at a time."""
        encoded = [perturb_encoding(cells[copies[i][0]], copies[i][1], self.params["perturbation"], cls_id=self.cls_id,
                                    eos_id=self.eos_id, max_genes=self.max_genes, quartiles=self.params.get("quartiles", 1))
                   for i in chunk]
        input_ids, mask = pad_cells([e[0] for e in encoded], pad_id=self.encoder.vocab.pad_id,
                                    multiple=self.encoder.pad_multiple, max_width=self.encoder.max_width)
        source = np.full(input_ids.shape, -1, np.int64)
        compare = np.zeros(input_ids.shape, bool)
        for row, ((new_ids, src), i) in enumerate(zip(encoded, chunk)):
            source[row, : src.size] = src
            compare[row, : src.size] = comparison_mask(new_ids, src, copies[i][1], self.special)
        return input_ids, mask, source, compare

    def _single_deletions(self, cells, copies) -> np.ndarray | None:
        """Where each copy deletes its one gene, when every copy of the block deletes one gene the cell has
        (Geneformer's every-gene deletion): such sub-batches are built by index arithmetic, not per copy."""
        if self.params["perturbation"] != "delete" or any(len(tokens) != 1 for _, tokens in copies):
            return None
        where = [{t: i for i, t in enumerate(c.tolist())} for c in cells]
        positions = [where[owner].get(tokens[0], -1) for owner, tokens in copies]
        return None if -1 in positions else np.array(positions, np.int64)

    def _deletion_batch(self, cells, copies, chunk, deleted_at):
        """``_encoded_batch`` for single-gene deletions: position j of a copy is position j (or j + 1 past the
        deleted one) of its cell."""
        owners = np.array([copies[i][0] for i in chunk])
        length = np.array([len(c) for c in cells])[owners] - 1  # (batch,)
        at = deleted_at[chunk]
        width = -(-int(length.max()) // self.encoder.pad_multiple) * self.encoder.pad_multiple
        width = max(min(width, self.encoder.max_width), int(length.max()))
        j = np.arange(width)[None, :]
        real = j < length[:, None]
        source = np.where(real, j + (j >= at[:, None]), -1)  # (batch, width)
        flat = np.concatenate(cells)
        offsets = (np.cumsum([len(c) for c in cells]) - np.array([len(c) for c in cells]))[owners]
        input_ids = np.where(real, flat[offsets[:, None] + np.maximum(source, 0)], self.encoder.vocab.pad_id)
        compare = real & ~np.isin(input_ids, self.special)
        return input_ids.astype(np.int64), real.astype(np.int64), source, compare

    def _encoded_length(self, ids: np.ndarray, present: set, tokens: tuple) -> int:
        """The length of ``perturb_encoding``'s result, without building it (for length-sorting)."""
        hits = sum(t in present for t in tokens)
        kind = self.params["perturbation"]
        if kind == "delete":
            return ids.size - hits
        if kind == "overexpress":
            special = int(ids.size > 0 and ids[0] == self.cls_id) + int(ids.size > 1 and ids[-1] == self.eos_id)
            return special + min(ids.size - special - hits + len(tokens), self.max_genes)
        return ids.size

    def _compare(self, hidden, genes, owners, source, compare, before) -> dict:
        """(batch,) measures of a sub-batch of copies; ``gene_cos`` (batch, width) the per-gene cosines."""
        index = before["offsets"][owners].unsqueeze(1) + source.clamp_min(0)  # (batch, width)
        gene_cos = torch.nn.functional.cosine_similarity(hidden, before["states"][index], dim=-1)  # (batch, width)
        gene_cos = gene_cos.masked_fill(~compare, 0.0)
        counted = compare.sum(1).clamp_min(1)
        gene_mean = mean_pool(hidden, genes)
        cell = hidden[:, 0] if self.cls_mode else gene_mean
        cos = torch.nn.functional.cosine_similarity
        values = {"cosine": cos(cell, before["cell"][owners], dim=-1) if self.cls_mode else gene_cos.sum(1) / counted,
                  "cell_shift": 1.0 - cos(gene_mean, before["gene_mean"][owners], dim=-1), "gene_cos": gene_cos}
        for label, state in self.states.items():
            values[f"shift_to_{label}"] = cos(cell, state.unsqueeze(0), dim=-1) - cos(before["cell"][owners], state.unsqueeze(0), dim=-1)
        return values

    # -- output --------------------------------------------------------------------------------
    def _write_gene_rows(self, sink, chunk, copies, cell_ids, ids, compare, gene_cos) -> None:
        """One row group: every compared gene of every copy in the sub-batch (nulls are no network)."""
        keep = [row for row, i in enumerate(chunk) if self._roles[i] != "null"]
        if not keep:
            return
        mask = compare[keep]
        counts = mask.sum(1)
        chosen = [chunk[row] for row in keep]
        sink.write(pa.table({
            "cell_id": np.repeat([cell_ids[copies[i][0]] for i in chosen], counts),
            "role": np.repeat([self._roles[i] for i in chosen], counts),
            "perturbed": np.repeat([self._keys[i] for i in chosen], counts).astype(np.int32),
            "affected": ids.cpu().numpy()[keep][mask].astype(np.int32),
            "cosine": gene_cos.float().cpu().numpy()[keep][mask]}, schema=GENE_SHIFT_SCHEMA))

    def _write_rows(self, cell_ids, rows, measures, before) -> None:
        n = len(rows)
        copy = np.array([r[2] for r in rows], np.int64)
        is_copy = copy >= 0
        columns = {"cell_id": [cell_ids[r[0]] for r in rows], "role": [r[1].role for r in rows],
                   "gene_token": np.array([r[1].gene_token for r in rows], np.int64),
                   "perturbed": [list(r[1].tokens) for r in rows]}
        for key, values in measures.items():
            column = np.ones(n) if key == "cosine" else np.zeros(n)
            column[is_copy] = values[copy[is_copy]]
            columns[key] = column
        columns["shift"] = 1.0 - columns["cosine"]
        if self.states:  # an original row records the cell's own cosine to each state
            originals = np.flatnonzero(~is_copy)
            owners = torch.tensor([rows[i][0] for i in originals], device=self.encoder.device)
            with torch.inference_mode():
                for label, state in self.states.items():
                    sims = torch.nn.functional.cosine_similarity(before["cell"][owners], state.unsqueeze(0), dim=-1)
                    columns[f"shift_to_{label}"][originals] = sims.double().cpu().numpy()
        with atomic_file(self.out / "shifts" / f"part-{part_name(cell_ids)}.parquet") as tmp:
            pq.write_table(pa.table(columns), tmp)


class GeneShiftWriter:
    """A parquet part written a row group at a time under a temporary name, renamed when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.writer = path, None, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{uuid.uuid4().hex[:8]}{self.path.suffix}")
            self.writer = pq.ParquetWriter(self.tmp, GENE_SHIFT_SCHEMA, compression="zstd")
        self.writer.write_table(table)

    def commit(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.tmp.replace(self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
