"""Corpus folders: parquet shards + manifest.json, and their readers (Ray Data, pyarrow).

    manifest = read_manifest("corpus/")
    ds = read_corpus("corpus/", vocab="gc30M", columns=["input_ids", "length", "cell_id"], shuffle_seed=0)

A corpus is written under a temporary sibling name and renamed into place only when complete
(``geneformer_ray.files``), so a crash never leaves a folder that looks like a finished corpus.
Readers check the manifest's vocabulary hash against the model's vocabulary and refuse a mismatch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from geneformer_ray import __version__
from geneformer_ray.data.encode import HISTOGRAM_BIN, length_histogram
from geneformer_ray.data.vocab import Vocabulary, load_vocab

FORMAT_NAME = "geneformer-ray-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
PARQUET_COMPRESSION = "zstd"


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
    ids = pc.list_slice(table.column("input_ids"), 0, max_genes).cast(table.schema.field("input_ids").type)
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", ids)
    length = pc.list_value_length(ids).cast(table.schema.field("length").type)
    return table.set_column(table.schema.get_field_index("length"), "length", length)
