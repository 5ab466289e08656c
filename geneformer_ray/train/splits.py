"""Train / validation / test splits of cells, and k-fold splits of genes.

    split = split_cells(labels, method="stratified", val_fraction=0.1, test_fraction=0.2, seed=0)
    split = split_cells(labels, method="group", groups=donors, val_fraction=0.1, test_fraction=0.2)
    split = split_from_id_lists(cell_ids, {"train": "train.txt", "val": "val.txt", "test": "test.txt"})
    folds = gene_folds(genes, classes, num_folds=5, seed=0)   # [(train genes, test genes), ...]

Every function returns plain arrays the driver turns into Ray Data filters; a group never lands in
two splits and a gene never lands in the train and test side of the same fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

SPLITS = ("train", "val", "test")


def split_cells(labels: np.ndarray, *, method: str = "stratified", val_fraction: float = 0.1, test_fraction: float = 0.2,
                groups: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Each cell's split ('train' / 'val' / 'test'), as a string array aligned with ``labels``."""
    labels = np.asarray(labels)
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction}: need 0 <= val, 0 < test, val + test < 1")
    rng = np.random.default_rng(seed)
    if method == "stratified":
        return _stratified(labels, val_fraction, test_fraction, rng)
    if method == "group":
        if groups is None:
            raise ValueError("split.method=group needs split.group_column (e.g. donor or patient)")
        return _grouped(np.asarray(groups), val_fraction, test_fraction, rng)
    raise ValueError(f"split.method={method!r}: use stratified, group or ids")


def _stratified(labels, val_fraction, test_fraction, rng) -> np.ndarray:
    split = np.full(labels.size, "train", dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        if idx.size < 2:
            raise ValueError(f"class {str(label)!r} has {idx.size} cell; a stratified split needs at least 2 per class "
                             "(raise task.min_class_size to drop it)")
        num_test = max(1, int(round(idx.size * test_fraction)))
        num_val = int(round(idx.size * val_fraction)) if idx.size - num_test > 1 else 0
        split[idx[:num_test]] = "test"
        split[idx[num_test : num_test + num_val]] = "val"
    return split.astype(str)


def _grouped(groups, val_fraction, test_fraction, rng) -> np.ndarray:
    names, sizes = np.unique(groups, return_counts=True)
    needed = 2 + (val_fraction > 0)
    if names.size < needed:
        raise ValueError(f"a grouped split needs at least {needed} groups; the group column has {names.size} "
                         f"({', '.join(map(str, names[:5]))}); use split.method=stratified")
    order = rng.permutation(names.size)
    total, filled = sizes.sum(), 0
    assignment = {}
    for position, i in enumerate(order):  # test groups first, then validation, the rest train
        remaining = names.size - position
        if filled < total * test_fraction and remaining > needed - 1:
            assignment[names[i]] = "test"
        elif filled < total * (test_fraction + val_fraction) and remaining > 1:
            assignment[names[i]] = "val"
        else:
            assignment[names[i]] = "train"
        filled += sizes[i]
    return np.array([assignment[g] for g in groups], dtype=str)


def split_from_id_lists(cell_ids: np.ndarray, id_lists: dict[str, str | Path]) -> np.ndarray:
    """Splits given as text files of cell ids (one per line); cells in none of them are left out ('')."""
    unknown = set(id_lists) - set(SPLITS)
    if unknown or "train" not in id_lists:
        raise ValueError(f"split.ids needs a 'train' file and optionally 'val' and 'test'; got {sorted(id_lists)}")
    where: dict[str, str] = {}
    for name, path in id_lists.items():
        if not Path(path).exists():
            raise ValueError(f"split.ids.{name}: {path} does not exist")
        for cell in Path(path).read_text().split():
            if where.setdefault(cell, name) != name:
                raise ValueError(f"cell {cell!r} is listed in both split.ids.{where[cell]} and split.ids.{name}")
    known = set(map(str, cell_ids))
    missing = [c for c in where if c not in known]
    if len(missing) == len(where):
        raise ValueError(f"none of the {len(where):,} cell ids in split.ids is in the corpus (e.g. {missing[0]!r}); "
                         "use the corpus cell_id values (obs names, or the tokenizer's --cell-id-column)")
    return np.array([where.get(str(c), "") for c in cell_ids], dtype=object).astype(str)


def gene_folds(genes: list[str], classes: list[str], *, num_folds: int = 5, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Stratified k-fold over genes: [(train genes, test genes)] with every gene tested exactly once."""
    classes = np.asarray(classes)
    smallest = min(np.unique(classes, return_counts=True)[1])
    if num_folds < 2 or smallest < num_folds:
        raise ValueError(f"task.num_folds={num_folds}: needs 2 <= folds <= genes in the smallest class ({smallest})")
    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(np.zeros(len(genes)), classes)
    return [([genes[i] for i in train], [genes[i] for i in test]) for train, test in folds]
