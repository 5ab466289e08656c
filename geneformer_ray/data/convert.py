"""Geneformer's tokenized datasets (``Dataset.save_to_disk`` folders, e.g. Genecorpus-30M) -> corpus folders.

    geneformer-ray convert-dataset genecorpus.dataset --out corpus/ [--vocab gc30M]

Streams one Arrow record batch at a time, so memory stays flat however large the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geneformer_ray.console import progress_bar
from geneformer_ray.data.corpus import DEFAULT_VAL_FRACTION, PARQUET_COMPRESSION, ROW_GROUP_CELLS, with_split, write_manifest
from geneformer_ray.data.vocab import Vocabulary, load_vocab
from geneformer_ray.files import discard_output, finalize_output, prepare_output, sha256_file


def convert_hf_dataset(dataset_dir: str | Path, out: str | Path, *, vocab: str | Vocabulary | None = None,
                       overwrite: bool = False, cells_per_shard: int = 50_000, val_fraction: float = DEFAULT_VAL_FRACTION,
                       progress: bool = True) -> dict:
    """Stream a Geneformer tokenized dataset (``Dataset.save_to_disk`` folder) into a corpus folder.

    Reads one Arrow record batch at a time, so memory stays flat however large the dataset. The
    vocabulary is inferred from the tokens when they say it (<cls>/<eos> around every cell -> gc104M,
    ids beyond gc104M's range -> gc30M); otherwise pass ``vocab``. Each cell's pretraining split
    (``val_fraction``, by a hash of its id) is written with it.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    dataset_dir = Path(dataset_dir)
    arrow_files = _dataset_arrow_files(dataset_dir)
    total_rows = sum(_ipc_rows(p) for p in arrow_files)
    tmp = prepare_output(out, overwrite=overwrite)
    try:
        vocab = load_vocab(vocab) if vocab is not None else None
        shard_files, writer, rows_in_shard, row = [], None, 0, 0
        bar = progress_bar(total=total_rows, unit="cells", desc="convert", disable=not progress)
        for path in arrow_files:
            with pa.OSFile(str(path)) as source:  # read, not mapped: memory stays one batch, not the file's pages
                for batch in _open_ipc(source):
                    if vocab is None:
                        vocab = _infer_vocab(batch, dataset_dir)
                    table = with_split(_convert_batch(batch, vocab, first_row=row, where=dataset_dir), val_fraction)
                    row += table.num_rows
                    bar.update(table.num_rows)
                    while table.num_rows:
                        if writer is None:
                            shard_files.append(tmp / f"convert-{len(shard_files):05d}.parquet")
                            writer = pq.ParquetWriter(shard_files[-1], table.schema, compression=PARQUET_COMPRESSION)
                        take = min(table.num_rows, cells_per_shard - rows_in_shard)
                        writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_CELLS)
                        table, rows_in_shard = table.slice(take), rows_in_shard + take
                        if rows_in_shard == cells_per_shard:
                            writer.close()
                            writer, rows_in_shard = None, 0
        if writer is not None:
            writer.close()
        bar.close()
        if vocab is None or row == 0:
            raise ValueError(f"{dataset_dir}: the dataset has no rows; nothing to convert")
        sources = [{"path": str(p.absolute()), "sha256": sha256_file(p), "num_cells": _ipc_rows(p)} for p in arrow_files]
        summary = {"cells_in": row, "cells_out": row}
        manifest = write_manifest(tmp, vocab=vocab, shard_files=shard_files, sources=sources, summary=summary,
                                  settings={"converted_from": str(dataset_dir.absolute()), "val_fraction": val_fraction},
                                  val_fraction=val_fraction)
    except BaseException:
        discard_output(tmp)
        raise
    finalize_output(tmp, out)
    return manifest


def _dataset_arrow_files(dataset_dir: Path) -> list[Path]:
    if not dataset_dir.is_dir():
        raise ValueError(f"{dataset_dir} is not a folder; pass the folder written by datasets' save_to_disk")
    if (dataset_dir / "dataset_dict.json").exists():
        splits = json.loads((dataset_dir / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{dataset_dir} is a DatasetDict with splits {splits}; convert one split folder, e.g. {dataset_dir / splits[0]}" if splits else f"{dataset_dir} is an empty DatasetDict")
    state = dataset_dir / "state.json"
    if state.exists():
        files = [dataset_dir / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    else:
        files = sorted(dataset_dir.glob("*.arrow"))
    if not files:
        raise ValueError(f"{dataset_dir} holds no .arrow files; is it a Hugging Face dataset saved with save_to_disk?")
    return files


def _open_ipc(source):
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return _file_batches(pa.ipc.open_file(source))


def _file_batches(reader):
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def _ipc_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return sum(b.num_rows for b in _open_ipc(source))


def _infer_vocab(batch: pa.RecordBatch, where: Path) -> Vocabulary:
    ids = _input_ids(batch, where)
    flat = ids.values.to_numpy()
    v2 = load_vocab("gc104M")
    starts = ids.offsets.to_numpy()
    lengths = np.diff(starts)
    nonempty = lengths > 0
    first = flat[starts[:-1][nonempty]]
    last = flat[starts[1:][nonempty] - 1]
    if nonempty.any() and (first == v2.cls_id).all() and (last == v2.eos_id).all():
        return v2
    if flat.size and flat.max() >= v2.num_tokens:
        return load_vocab("gc30M")
    raise ValueError(f"{where}: cannot tell the vocabulary from the tokens (no <cls>/<eos> wrapping, ids all below {v2.num_tokens}); pass --vocab")


def _input_ids(batch: pa.RecordBatch, where: Path) -> pa.ListArray:
    if "input_ids" not in batch.schema.names:
        raise ValueError(f"{where}: no 'input_ids' column (columns: {batch.schema.names}); is this a Geneformer tokenized dataset?")
    ids = batch.column("input_ids")
    if isinstance(ids, pa.LargeListArray) or ids.type.value_type != pa.int32():
        ids = ids.cast(pa.list_(pa.int32()))
    return ids


def _convert_batch(batch: pa.RecordBatch, vocab: Vocabulary, *, first_row: int, where: Path) -> pa.Table:
    ids = _input_ids(batch, where)
    lengths = np.diff(ids.offsets.to_numpy()).astype(np.int32)
    flat = ids.values.to_numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= vocab.num_tokens):
        raise ValueError(f"{where}: token ids range {flat.min()}..{flat.max()} but vocabulary {vocab.name} has {vocab.num_tokens}; pass the matching --vocab")
    if lengths.size and lengths.max() > vocab.model_input_size:
        raise ValueError(f"{where}: a cell has {lengths.max()} tokens, more than the model input size {vocab.model_input_size} of {vocab.name}; pass the matching --vocab")
    if "length" in batch.schema.names and not np.array_equal(batch.column("length").to_numpy(zero_copy_only=False), lengths):
        raise ValueError(f"{where}: rows {first_row}.. have a 'length' column that disagrees with input_ids; the dataset is inconsistent")
    names = [n for n in batch.schema.names if n not in ("input_ids", "length")]
    if "cell_id" in names:
        cell_id = batch.column("cell_id").cast(pa.string())
        names.remove("cell_id")
    else:
        cell_id = pa.array([f"{where.name}:{i}" for i in range(first_row, first_row + batch.num_rows)], pa.string())
    columns = {"input_ids": ids, "length": pa.array(lengths), "cell_id": cell_id}
    columns.update({n: batch.column(n) for n in names})
    return pa.table(columns)
