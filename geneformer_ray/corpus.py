"""Corpus directories: parquet shards + manifest.json; Geneformer dataset conversion; Ray Data reader.

    geneformer-ray convert-dataset genecorpus.dataset --out corpus/ [--vocab gc30M]

A corpus is written under a temporary sibling name and renamed into place only when complete, so a
crash never leaves a folder that looks like a finished corpus. Readers check the manifest's
vocabulary hash against the model's vocabulary and refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geneformer_ray import __version__
from geneformer_ray.tokenize import HISTOGRAM_BIN, length_histogram
from geneformer_ray.vocab import Vocabulary, load_vocab

FORMAT_NAME = "geneformer-ray-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
PARQUET_COMPRESSION = "zstd"


# -- output folder lifecycle ----------------------------------------------------------------------
def prepare_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """Check ``out`` can be written and return a fresh temporary sibling folder to build it in."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is a file; pass a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def finalize_output(tmp: Path, out: str | Path) -> Path:
    """Move the finished ``tmp`` folder to ``out``; an old ``out`` is removed only after the swap."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard_output(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file under a temporary name, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


# -- manifest -------------------------------------------------------------------------------------
def write_manifest(tmp: Path, *, vocab: Vocabulary, shard_files: list[Path], sources: list[dict],
                   summary: dict, settings: dict) -> dict:
    """Rename shards to part-NNNNN in order, unify their schemas, and write manifest.json."""
    empty = [p for p in shard_files if pq.read_metadata(p).num_rows == 0]
    for path in empty:
        path.unlink()
    shard_files = [p for p in shard_files if p not in empty]
    schema = _unify_schemas(shard_files)
    shards, hist, lengths_total, n_cells = [], None, 0, 0
    for i, path in enumerate(shard_files):
        final = tmp / SHARD_PATTERN.format(i)
        path.rename(final)
        lengths = pq.read_table(final, columns=["length"])["length"].to_numpy()
        h = length_histogram(lengths, vocab.model_input_size)
        hist = h if hist is None else hist + h
        shards.append({"path": final.name, "num_cells": int(lengths.size), "num_tokens": int(lengths.sum()),
                       "bytes": final.stat().st_size})
        lengths_total += int(lengths.sum())
        n_cells += int(lengths.size)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"geneformer-ray {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vocab": vocab.describe(),
        "model_input_size": vocab.model_input_size,
        "special_tokens": vocab.special_token_ids,
        "adds_cls_eos": vocab.adds_cls_eos,
        "num_cells": n_cells,
        "num_tokens": lengths_total,
        "length_histogram": {
            "bin_width": HISTOGRAM_BIN,
            "counts": hist.tolist() if hist is not None else [],
        },
        "columns": {f.name: str(f.type) for f in schema} if schema is not None else {},
        "shards": shards,
        "sources": sources,
        "settings": settings,
        "summary": summary,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _unify_schemas(paths: list[Path]) -> pa.Schema | None:
    """Make every shard share one schema (int + float -> float, null -> typed, otherwise -> string;
    a column some inputs lack is null in their shards)."""
    if not paths:
        return None
    schemas = [pq.read_schema(p) for p in paths]
    if all(s.equals(schemas[0]) for s in schemas):
        return schemas[0]
    try:
        target = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fields = {}
        for s in schemas:
            for f in s:
                fields[f.name] = f if fields.get(f.name, f).type == f.type else pa.field(f.name, pa.string())
        target = pa.schema(list(fields.values()))
    for path, schema in zip(paths, schemas):
        if not schema.equals(target):
            table = pq.read_table(path)
            for f in target:
                if f.name not in table.column_names:
                    table = table.append_column(f, pa.nulls(table.num_rows, f.type))
            table = table.select(target.names).cast(target)
            pq.write_table(table, path.with_suffix(".rewrite"), compression=PARQUET_COMPRESSION)
            path.with_suffix(".rewrite").replace(path)
    return target


def read_manifest(corpus: str | Path) -> dict:
    corpus = Path(corpus)
    path = corpus / MANIFEST
    if not path.exists():
        raise ValueError(f"{corpus} is not a corpus folder (no {MANIFEST}); create one with `geneformer-ray tokenize` or `convert-dataset`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')} is not {FORMAT_NAME} v{FORMAT_VERSION}")
    return manifest


def check_vocab(manifest: dict, vocab: Vocabulary | str, *, corpus: str | Path = "corpus") -> None:
    """Refuse a corpus tokenized with a different vocabulary than the model's."""
    vocab = load_vocab(vocab)
    theirs = manifest["vocab"]
    if theirs["sha256"] != vocab.sha256:
        raise ValueError(
            f"{corpus} was tokenized with vocabulary {theirs['name']} (sha256 {theirs['sha256'][:12]}) but the model uses "
            f"{vocab.name} (sha256 {vocab.sha256[:12]}); re-tokenize the data with --vocab {vocab.name} or use a model of that vocabulary"
        )


def shard_paths(corpus: str | Path) -> list[str]:
    corpus = Path(corpus)
    return [str(corpus / s["path"]) for s in read_manifest(corpus)["shards"]]


def read_corpus(corpus: str | Path, *, vocab: Vocabulary | str | None = None, columns: list[str] | None = None,
                shuffle_seed: int | None = None):
    """A Ray Dataset over the corpus shards, after checking the manifest (and the vocabulary).

    With ``shuffle_seed`` the shard order is shuffled, differently at every execution of the
    dataset (each training epoch) and the same sequence of orders for the same seed: Ray Data's
    ``FileShuffleConfig`` with ``reseed_after_execution``, and order preserved through the parallel
    reads so that parallelism does not undo the seed.
    """
    import ray.data

    manifest = read_manifest(corpus)
    if vocab is not None:
        check_vocab(manifest, vocab, corpus=corpus)
    shuffle = None if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    # The manifest already lists the shards, so Ray Data's V2 parquet path (a ListFiles task per
    # execution) only adds start-up: ~7 s per pass on a small cluster against ~1 s for V1, paid at
    # every epoch and every validation pass. The flag only decides which reader this call builds.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(shard_paths(corpus), shuffle=shuffle)
    finally:
        context.use_datasource_v2 = use_v2
    if shuffle is not None:
        ds.context.execution_options.preserve_order = True
    return ds.select_columns(columns) if columns else ds


def read_columns(corpus: str | Path, columns: list[str]):
    """Some columns of every shard as one pyarrow Table, in corpus order (driver-side label work)."""
    tables = [pq.read_table(p, columns=columns) for p in shard_paths(corpus)]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def keep_top_genes(table: pa.Table, max_genes: int) -> pa.Table:
    """The cells of ``table`` with only their ``max_genes`` top-ranked genes (``input_ids`` and ``length``).
    For V1 encodings (genes only, highest rank first); a V2 cell would lose its <eos>."""
    import pyarrow.compute as pc

    ids = pc.list_slice(table.column("input_ids"), 0, max_genes).cast(table.schema.field("input_ids").type)
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", ids)
    length = pc.list_value_length(ids).cast(table.schema.field("length").type)
    return table.set_column(table.schema.get_field_index("length"), "length", length)


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- Geneformer save_to_disk datasets -------------------------------------------------------------
def convert_hf_dataset(dataset_dir: str | Path, out: str | Path, *, vocab: str | Vocabulary | None = None,
                       overwrite: bool = False, cells_per_shard: int = 50_000, progress: bool = True) -> dict:
    """Stream a Geneformer tokenized dataset (``Dataset.save_to_disk`` folder) into a corpus folder.

    Reads one Arrow record batch at a time, so memory stays flat however large the dataset. The
    vocabulary is inferred from the tokens when they say it (<cls>/<eos> around every cell -> gc104M,
    ids beyond gc104M's range -> gc30M); otherwise pass ``vocab``.
    """
    from tqdm import tqdm

    dataset_dir = Path(dataset_dir)
    arrow_files = _dataset_arrow_files(dataset_dir)
    total_rows = sum(_ipc_rows(p) for p in arrow_files)
    tmp = prepare_output(out, overwrite=overwrite)
    try:
        vocab = load_vocab(vocab) if vocab is not None else None
        shard_files, writer, rows_in_shard, row = [], None, 0, 0
        bar = tqdm(total=total_rows, unit="cells", desc="convert", disable=not progress)
        for path in arrow_files:
            with pa.memory_map(str(path)) as source:
                for batch in _open_ipc(source):
                    if vocab is None:
                        vocab = _infer_vocab(batch, dataset_dir)
                    table = _convert_batch(batch, vocab, first_row=row, where=dataset_dir)
                    row += table.num_rows
                    bar.update(table.num_rows)
                    while table.num_rows:
                        if writer is None:
                            shard_files.append(tmp / f"convert-{len(shard_files):05d}.parquet")
                            writer = pq.ParquetWriter(shard_files[-1], table.schema, compression=PARQUET_COMPRESSION)
                        take = min(table.num_rows, cells_per_shard - rows_in_shard)
                        writer.write_table(table.slice(0, take))
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
                                  settings={"converted_from": str(dataset_dir.absolute())})
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
