"""Corpus folders: parquet shards + manifest.json, and their readers (Ray Data, pyarrow).

    manifest = read_manifest("corpus/")
    ds = read_corpus("corpus/", vocab="gc30M", columns=["input_ids", "length", "cell_id"], shuffle_seed=0)

A corpus is written under a temporary sibling name and renamed into place only when complete
(``geneformer_ray.files``), so a crash never leaves a folder that looks like a finished corpus.
Readers check the manifest's vocabulary hash against the model's vocabulary and refuse a mismatch.

Format 2 records each cell's pretraining split when the shard is written (``pretrain_split``:
'train' or 'val', by a hash of ``cell_id`` so the same cells are held out in every run and corpus),
the counts in the manifest (``split``, per shard ``num_val``), and each shard's first cell number
(``first_cell``: a cell's number in the corpus is its shard's first cell + its row). Format-1
corpora stay readable; ``upgrade_corpus`` adds their split in place.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from geneformer_ray import __version__
from geneformer_ray.console import progress_bar
from geneformer_ray.data.encode import HISTOGRAM_BIN, length_histogram
from geneformer_ray.data.vocab import Vocabulary, load_vocab
from geneformer_ray.files import write_json

FORMAT_NAME = "geneformer-ray-corpus"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no split recorded (upgrade_corpus adds it)
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
PARQUET_COMPRESSION = "zstd"
ROW_GROUP_CELLS = 4096  # a reader that wants some rows of a shard decodes only their row groups
SPLIT_COLUMN = "pretrain_split"
SPLIT_RULE = "val when crc32(utf-8 cell_id) < val_fraction * 2**32"
DEFAULT_VAL_FRACTION = 0.02


# -- the pretraining split, recorded when a shard is written ---------------------------------------
def assign_split(cell_ids, val_fraction: float) -> pa.Array:
    """Each cell's pretraining split ('train' / 'val') by a hash of its id: stable across runs, corpora
    and worker counts (the rule pretraining used before it was written down, so old splits carry over)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    threshold = int(val_fraction * 2**32)
    ids = cell_ids.to_pylist() if isinstance(cell_ids, (pa.Array, pa.ChunkedArray)) else list(cell_ids)
    is_val = np.fromiter((zlib.crc32(str(c).encode()) < threshold for c in ids), dtype=bool, count=len(ids))
    return pa.DictionaryArray.from_arrays(pa.array(is_val.astype(np.int8)), pa.array(["train", "val"]))


def with_split(table: pa.Table, val_fraction: float) -> pa.Table:
    """``table`` with its ``pretrain_split`` column (from ``cell_id``)."""
    if SPLIT_COLUMN in table.column_names:
        raise ValueError(f"the input already has a column named {SPLIT_COLUMN!r}, which the corpus reserves; rename it")
    return table.append_column(SPLIT_COLUMN, assign_split(table.column("cell_id"), val_fraction))


def split_info(manifest: dict, *, corpus: str | Path = "corpus") -> dict:
    """The manifest's recorded split ({val_fraction, rule, num_train, num_val}); refuses a format-1 corpus."""
    if "split" not in manifest:
        raise ValueError(f"{corpus} was written before the pretraining split was recorded (corpus format 1); "
                         f"add it in place with `geneformer-ray upgrade-corpus {corpus} --val-fraction "
                         f"{DEFAULT_VAL_FRACTION}` (the same cells as before are held out), or tokenize again")
    return manifest["split"]


# -- manifest -------------------------------------------------------------------------------------
def write_manifest(tmp: Path, *, vocab: Vocabulary, shard_files: list[Path], sources: list[dict],
                   summary: dict, settings: dict, val_fraction: float) -> dict:
    """Rename shards to part-NNNNN in order, unify their schemas, and write manifest.json (shards
    carry their ``pretrain_split`` column, written with ``val_fraction``)."""
    empty = [p for p in shard_files if pq.read_metadata(p).num_rows == 0]
    for path in empty:
        path.unlink()
    shard_files = [p for p in shard_files if p not in empty]
    schema = _unify_schemas(shard_files)
    shards, hist, lengths_total, n_cells = [], None, 0, 0
    for i, path in enumerate(shard_files):
        final = tmp / SHARD_PATTERN.format(i)
        path.rename(final)
        columns = pq.read_table(final, columns=["length", SPLIT_COLUMN])
        lengths = columns["length"].to_numpy()
        h = length_histogram(lengths, vocab.model_input_size)
        hist = h if hist is None else hist + h
        shards.append({"path": final.name, "num_cells": int(lengths.size), "num_tokens": int(lengths.sum()),
                       "num_val": _count_val(columns[SPLIT_COLUMN]), "first_cell": n_cells, "bytes": final.stat().st_size})
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
        "split": _split_summary(shards, val_fraction),
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


def _count_val(split: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.equal(split.cast(pa.string()), "val")).as_py() or 0)


def _split_summary(shards: list[dict], val_fraction: float) -> dict:
    num_val = sum(s["num_val"] for s in shards)
    return {"val_fraction": val_fraction, "rule": SPLIT_RULE, "column": SPLIT_COLUMN,
            "num_train": sum(s["num_cells"] for s in shards) - num_val, "num_val": num_val}


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
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')} is not "
                         f"{FORMAT_NAME} v{' or v'.join(map(str, READABLE_VERSIONS))}; it was written by another release")
    return manifest


def upgrade_corpus(corpus: str | Path, *, val_fraction: float = DEFAULT_VAL_FRACTION, progress: bool = True) -> dict:
    """Record the pretraining split of a format-1 corpus in place (format 2); returns the new manifest.

    Each shard is rewritten with its ``pretrain_split`` column under a new name beside the old one;
    the new manifest then replaces the old in one rename, and only after that are the old shards
    removed. A crash before the rename leaves the old corpus as it was (run the command again).
    """
    corpus = Path(corpus).absolute()
    manifest = read_manifest(corpus)
    if manifest["format_version"] == FORMAT_VERSION:
        return manifest
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    stamp = time.strftime("%Y%m%d%H%M%S")
    shards, old = [], []
    shown = progress_bar(total=len(manifest["shards"]), desc="upgrade", unit="shard", disable=not progress)
    for i, shard in enumerate(manifest["shards"]):
        table = pq.read_table(corpus / shard["path"])
        new = corpus / f"part-{i:05d}-v2-{stamp}.parquet"
        pq.write_table(with_split(table, val_fraction), new, compression=PARQUET_COMPRESSION, row_group_size=ROW_GROUP_CELLS)
        first = sum(s["num_cells"] for s in shards)
        shards.append({**shard, "path": new.name, "num_val": _count_val(pq.read_table(new, columns=[SPLIT_COLUMN])[SPLIT_COLUMN]),
                       "first_cell": first, "bytes": new.stat().st_size})
        old.append(corpus / shard["path"])
        shown.update(1)
    shown.close()
    upgraded = {**manifest, "format_version": FORMAT_VERSION, "shards": shards, "split": _split_summary(shards, val_fraction),
                "columns": {**manifest["columns"], SPLIT_COLUMN: "dictionary<values=string, indices=int8, ordered=0>"},
                "upgraded": {"from_version": 1, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    write_json(corpus / MANIFEST, upgraded)
    for path in old:
        path.unlink(missing_ok=True)
    return upgraded


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


def read_columns(corpus: str | Path, columns: list[str], *, cell_ids=None):
    """Some columns of every shard as one pyarrow Table, in corpus order (driver-side label work);
    ``cell_ids``: only these cells, kept shard by shard (a subset of a large corpus stays small)."""
    tables = [pq.read_table(p, columns=columns) for p in shard_paths(corpus)]
    if cell_ids is not None:
        tables = [keep_cells(t, cell_ids) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def keep_cells(table: pa.Table, cell_ids) -> pa.Table:
    """The rows of ``table`` whose cell_id is one of ``cell_ids``."""
    return table.filter(pc.is_in(table.column("cell_id").cast(pa.string()), value_set=pa.array(list(cell_ids), pa.string())))


def keep_top_genes(table: pa.Table, max_genes: int) -> pa.Table:
    """The cells of ``table`` with only their ``max_genes`` top-ranked genes (``input_ids`` and ``length``).
    For V1 encodings (genes only, highest rank first); a V2 cell would lose its <eos>."""
    ids = pc.list_slice(table.column("input_ids"), 0, max_genes).cast(table.schema.field("input_ids").type)
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", ids)
    length = pc.list_value_length(ids).cast(table.schema.field("length").type)
    return table.set_column(table.schema.get_field_index("length"), "length", length)
