"""The fine-tuning driver's preparation: labels, classes, splits and checks, before any worker starts.

    prepared = prepare_task(cfg)      # {"heads", "splits", "dropped", "vocab_name", "gene_report", "baseline"}

Runs on the driver without Ray: reads only the corpus's small columns (and, for gene tasks, the
token lists) with pyarrow, so every bad input is reported before a worker is placed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geneformer_ray.data.corpus import read_columns, read_manifest
from geneformer_ray.models.folders import resolve_model_config
from geneformer_ray.models.tasks import check_head
from geneformer_ray.train.baseline import logistic_regression_baseline
from geneformer_ray.train.collate import IGNORE_INDEX as IGNORE
from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.train.labels import class_table, gene_tokens, label_indices, read_gene_classes
from geneformer_ray.train.splits import gene_folds, split_cells, split_from_id_lists


def prepare_task(cfg: FinetuneConfig) -> dict:
    """Everything checked before any worker starts: vocabulary, columns, classes, head, splits."""
    manifest = read_manifest(cfg.data.corpus)
    _, vocab = resolve_model_config(init_from=cfg.model.init_from, flavour=cfg.model.flavour, manifest=manifest,
                                    corpus=cfg.data.corpus)
    task = cfg.task
    label_columns = {"cell": [task.label_column], "multitask": list(task.label_columns), "gene": []}[task.kind]
    derived = task.derived_columns
    needed = [derived[c]["source"] if c in derived else c for c in label_columns] \
        + ([cfg.split.group_column] if cfg.split.method == "group" else [])
    missing = [c for c in needed if c not in manifest["columns"]]
    if missing:
        raise ValueError(f"corpus {cfg.data.corpus} has no column {', '.join(map(repr, missing))}; it has "
                         f"{', '.join(c for c in manifest['columns'] if c not in ('input_ids', 'length'))}. "
                         "Carry the obs column when tokenizing (geneformer-ray tokenize ... --obs COLUMN)")
    table = read_columns(cfg.data.corpus, ["cell_id", *dict.fromkeys(needed)] + (["input_ids"] if task.kind == "gene" else []))
    for name, mapping in derived.items():  # e.g. lineage from cell_type
        values = [None if v is None else mapping.get(str(v), "other") for v in table.column(mapping["source"]).to_pylist()]
        table = table.append_column(name, pa.array(values, pa.string()))
    if cfg.data.max_cells and cfg.data.max_cells < table.num_rows:
        rows = np.sort(np.random.default_rng(cfg.split.seed).choice(table.num_rows, cfg.data.max_cells, replace=False))
        table = table.take(rows)
    prepared = {"vocab_name": vocab.name, "dropped": {}, "gene_report": None, "baseline": None}
    if task.kind == "gene":
        prepared.update(_prepare_genes(cfg, table, vocab))
    else:
        prepared.update(_prepare_cells(cfg, table, label_columns))
    if cfg.model.init_from:
        check_head(task.kind, prepared["heads"], cfg.model.init_from)
    if task.baseline and task.kind != "gene":
        prepared["baseline"] = logistic_regression_baseline(manifest, prepared["splits"][0]["cells"], prepared["heads"],
                                                            corpus=cfg.data.corpus, vocab_size=vocab.num_tokens)
    return prepared


def _prepare_cells(cfg: FinetuneConfig, table, label_columns: list[str]) -> dict:
    heads, dropped, labels = {}, {}, []
    for column in label_columns:
        values = table.column(column).to_pylist()
        classes, small = class_table(values, min_class_size=cfg.task.min_class_size, column=column)
        heads[column] = classes
        if small:
            dropped[column] = small
            print(f"dropped classes of {column!r} under task.min_class_size={cfg.task.min_class_size}: "
                  + ", ".join(f"{k} ({v} cells)" for k, v in small.items()), flush=True)
        labels.append(label_indices(values, classes))
    labels = np.stack(labels, 1)  # (cells, tasks)
    keep = (labels != IGNORE).any(1)
    cell_ids = np.array(table.column("cell_id").to_pylist(), dtype=object)[keep]
    labels = labels[keep]
    method = cfg.split.method
    if method == "ids":
        assignment = split_from_id_lists(cell_ids, cfg.split.ids)
    else:
        groups = np.array(table.column(cfg.split.group_column).to_pylist(), dtype=object)[keep].astype(str) \
            if method == "group" else None
        first = np.array(heads[label_columns[0]] + ["missing"], dtype=object)
        strata = first[np.where(labels[:, 0] == IGNORE, -1, labels[:, 0])].astype(str)  # class names, for messages
        assignment = split_cells(strata, method=method, val_fraction=cfg.split.val_fraction,
                                 test_fraction=cfg.split.test_fraction, groups=groups, seed=cfg.split.seed)
    single = cfg.task.kind == "cell"
    cells = {name: {c: (int(l[0]) if single else [int(x) for x in l]) for c, l in zip(cell_ids[assignment == name],
                                                                                     labels[assignment == name])}
             for name in ("train", "val", "test")}
    if not cells["train"] or not cells["test"]:
        raise ValueError(f"the {method} split left {len(cells['train'])} training and {len(cells['test'])} test cells; "
                         "adjust split.val_fraction / split.test_fraction or the id lists")
    split = {"cells": cells, "sizes": {k: len(v) for k, v in cells.items()}, "num_train": len(cells["train"])}
    if cfg.task.class_weights == "balanced":
        train_labels = labels[assignment == "train"]
        split["class_weights"] = {h: _balanced(train_labels[:, i], len(heads[h])) for i, h in enumerate(heads)}
    return {"heads": heads, "dropped": dropped, "splits": [split]}


def _balanced(labels: np.ndarray, num_classes: int) -> list[float]:
    counts = np.bincount(labels[labels != IGNORE], minlength=num_classes).astype(float)
    return (counts.sum() / (num_classes * np.maximum(counts, 1))).tolist()


def _prepare_genes(cfg: FinetuneConfig, table, vocab) -> dict:
    """Gene classes -> tokens present in the corpus -> folds split by gene (train / val / test genes)."""
    by_gene = read_gene_classes(cfg.task.gene_classes, label_column=cfg.task.gene_label_column)
    token_class, not_in_vocab = gene_tokens(by_gene, vocab)
    ids = table.column("input_ids").combine_chunks()
    flat = ids.flatten()
    rows = pc.list_parent_indices(ids).to_numpy()
    flat = flat.to_numpy()
    labelled = np.isin(flat, np.fromiter(token_class, dtype=np.int64))
    cell_of, token_of = rows[labelled], flat[labelled].astype(np.int64)
    cells_with = {int(t): np.unique(cell_of[token_of == t]) for t in np.unique(token_of)}
    present = sorted(cells_with)
    if not present:
        raise ValueError(f"none of the {len(by_gene)} genes in {cfg.task.gene_classes} occurs in corpus {cfg.data.corpus}; "
                         "check that the gene list and the corpus are for the same organism and vocabulary")
    class_of = {t: token_class[t] for t in present}
    names, counts = np.unique(list(class_of.values()), return_counts=True)
    small = {str(n): int(c) for n, c in zip(names, counts) if c < cfg.task.min_class_size}
    classes = [str(n) for n in names if str(n) not in small]
    if len(classes) < 2:
        raise ValueError(f"gene classification needs two classes with at least task.min_class_size={cfg.task.min_class_size} "
                         f"genes in the corpus; found {dict(zip(names.tolist(), counts.tolist()))}")
    tokens = [t for t in present if class_of[t] in classes]
    index = {c: i for i, c in enumerate(classes)}
    report = {"labelled": len(by_gene), "not_in_vocab": len(not_in_vocab), "not_in_corpus": len(token_class) - len(present),
              "used": len(tokens), "per_class": {c: int(sum(class_of[t] == c for t in tokens)) for c in classes},
              "dropped_classes": small}
    print(f"gene classes: {report}", flush=True)
    cell_ids = np.array(table.column("cell_id").to_pylist(), dtype=object)
    folds = gene_folds([str(t) for t in tokens], [class_of[t] for t in tokens], num_folds=cfg.task.num_folds,
                       seed=cfg.split.seed)[: cfg.task.max_folds]
    splits = []
    rng = np.random.default_rng(cfg.split.seed)
    for train_genes, test_genes in folds:
        train_genes = [int(g) for g in train_genes]
        num_val = int(round(len(train_genes) * cfg.split.val_fraction))
        val_genes = sorted(rng.choice(train_genes, num_val, replace=False).tolist()) if num_val else []
        genes = {"train": sorted(set(train_genes) - set(val_genes)), "val": val_genes, "test": [int(g) for g in test_genes]}
        cells = {name: {c: 0 for c in cell_ids[np.unique(np.concatenate([cells_with[t] for t in g]))]} if g else {}
                 for name, g in genes.items()}
        split = {"cells": cells, "num_train": len(cells["train"]), "genes": genes,
                 "sizes": {**{f"{k}_cells": len(v) for k, v in cells.items()}, **{f"{k}_genes": len(v) for k, v in genes.items()}},
                 "token_classes": {name: {t: index[class_of[t]] for t in g} for name, g in genes.items()}}
        if cfg.task.class_weights == "balanced":
            train_classes = np.array([index[class_of[t]] for t in genes["train"]])
            split["class_weights"] = {"gene_class": _balanced(train_classes, len(classes))}
        splits.append(split)
    return {"heads": {"gene_class": classes}, "dropped": {"gene_class": small} if small else {}, "splits": splits,
            "gene_report": report}


