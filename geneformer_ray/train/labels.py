"""Labels for fine-tuning: class tables from the corpus' metadata, gene classes from lists.

    classes, dropped = class_table(values, min_class_size=10, column="cell_type")
    labels = label_indices(values, classes)                         # -100 for missing / dropped
    by_gene = read_gene_classes("dosage_sens_tf_labels.csv")          # {ENSG: class}
    token_class, not_in_vocab = gene_tokens(by_gene, vocab)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_ray.data.vocab import Vocabulary


def class_table(values: list, *, min_class_size: int, column: str) -> tuple[list[str], dict[str, int]]:
    """Class names kept (sorted) and the classes dropped for size {name: count}; missing values
    (None, '', NaN) are not a class."""
    names, counts = np.unique(np.array([v for v in map(_label_text, values) if v is not None], dtype=object).astype(str),
                              return_counts=True)
    if names.size == 0:
        raise ValueError(f"column {column!r} holds no labels (all missing)")
    dropped = {str(n): int(c) for n, c in zip(names, counts) if c < min_class_size}
    kept = [str(n) for n in names if str(n) not in dropped]
    if len(kept) < 2:
        raise ValueError(f"column {column!r}: only {len(kept)} class(es) keep at least task.min_class_size={min_class_size} "
                         f"cells ({dict(zip(names.tolist(), counts.tolist()))}); lower task.min_class_size or choose another column")
    return kept, dropped


def label_indices(values: list, classes: list[str]) -> np.ndarray:
    """Each value's class index, -100 (ignored) for missing values and dropped classes."""
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup.get(_label_text(v), -100) for v in values], dtype=np.int64)


def _label_text(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value)
    return text if text and text.lower() != "nan" else None


def read_gene_classes(path: str | Path, *, label_column: str | None = None, gene_column: str | None = None) -> dict[str, str]:
    """Gene -> class from a CSV/TSV: wide (one column of Ensembl IDs per class, as Geneformer's
    ``dosage_sens_tf_labels.csv``) or long (a gene column plus ``label_column``)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"task.gene_classes: {path} does not exist")
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() in (".tsv", ".tab") else ",", dtype=str)
    if label_column is not None:
        if label_column not in table.columns:
            raise ValueError(f"{path} has no column {label_column!r} (columns: {', '.join(table.columns)})")
        gene_column = gene_column or next((c for c in table.columns if table[c].astype(str).str.startswith("ENSG").mean() > 0.5), None)
        if gene_column is None:
            raise ValueError(f"{path}: no column of Ensembl IDs found; name it with gene_column")
        pairs = [(g, c) for g, c in zip(table[gene_column], table[label_column]) if isinstance(g, str) and isinstance(c, str)]
    else:
        pairs = [(g, str(c)) for c in table.columns for g in table[c].dropna()]
    classes: dict[str, str] = {}
    clashes = sorted({g for g, c in pairs if classes.setdefault(g.strip(), c) != c})
    if clashes:
        raise ValueError(f"{path}: {len(clashes)} gene(s) are listed in two classes (e.g. {', '.join(clashes[:3])}); "
                         "each gene needs exactly one class")
    if len(set(classes.values())) < 2:
        raise ValueError(f"{path}: gene classification needs at least two classes; found {sorted(set(classes.values()))}")
    return classes


def gene_tokens(classes: dict[str, str], vocab: Vocabulary) -> tuple[dict[int, str], list[str]]:
    """Token id -> class for the genes in the vocabulary, and the genes that are not in it."""
    tokens, missing = {}, []
    for gene, label in classes.items():
        token = vocab.token_ids.get(gene)
        if token is None:
            missing.append(gene)
        else:
            tokens[int(token)] = label
    if not tokens:
        raise ValueError(f"none of the {len(classes)} labelled genes is in vocabulary {vocab.name} (e.g. {missing[0]})")
    return tokens, missing
