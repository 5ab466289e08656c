"""The baseline every cell-classification figure stands next to: logistic regression on log-normalised counts.

    result = logistic_regression_baseline(manifest, split_cells, heads)   # same cells, same split

Counts come from the corpus's source files (recorded in its manifest), normalised to 10,000 counts
per cell and log1p-transformed (the scanpy default), fitted on the training cells of the split and
scored on its test cells with the same metrics as the fine-tuned model.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def log_normalised_counts(manifest: dict, cell_ids: list[str]) -> sp.csr_matrix:
    """(cells, genes) log1p(counts / total * 1e4) for ``cell_ids``, read from the corpus sources."""
    settings = manifest.get("settings", {})
    id_column = settings.get("cell_id_column")
    layer = settings.get("layer")
    wanted = {c: i for i, c in enumerate(cell_ids)}
    blocks, order, var_names = [], [], None
    for source in manifest["sources"]:
        path = Path(source["path"])
        if not path.exists() or path.suffix != ".h5ad":
            raise ValueError(f"the baseline reads counts from the corpus sources; {path} is missing or not .h5ad. "
                             "Set task.baseline=false or keep the source file in place")
        adata = ad.read_h5ad(path)
        ids = adata.obs[id_column].astype(str).to_numpy() if id_column else adata.obs_names.to_numpy()
        rows = np.flatnonzero(np.isin(ids, list(wanted)))
        if var_names is not None and not np.array_equal(var_names, adata.var_names.to_numpy()):
            raise ValueError(f"{path} has different genes than the first source; the baseline needs one gene space")
        var_names = adata.var_names.to_numpy()
        matrix = adata.raw.X if layer == "raw" else adata.layers[layer] if layer and layer != "X" else adata.X
        blocks.append(sp.csr_matrix(matrix[rows], dtype=np.float64))
        order += [wanted[i] for i in ids[rows]]
    counts = sp.vstack(blocks).tocsr()
    if len(order) != len(cell_ids):
        raise ValueError(f"the baseline found {len(order):,} of {len(cell_ids):,} cells in the corpus sources")
    counts = counts[np.argsort(order)]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    counts = sp.diags(1e4 / np.maximum(totals, 1)) @ counts
    counts.data = np.log1p(counts.data)
    return counts.tocsr()


def logistic_regression_baseline(manifest: dict, cells: dict[str, dict], heads: dict[str, list[str]], *,
                                 max_iter: int = 2000) -> dict:
    """Per label column: test macro-F1 and accuracy of logistic regression fitted on the training cells."""
    started = time.perf_counter()
    train_ids, test_ids = list(cells["train"]), list(cells["test"])
    features = log_normalised_counts(manifest, train_ids + test_ids)
    x_train, x_test = features[: len(train_ids)], features[len(train_ids):]
    out = {}
    for i, (head, classes) in enumerate(heads.items()):
        y_train = np.array([np.atleast_1d(cells["train"][c])[i] for c in train_ids])
        y_test = np.array([np.atleast_1d(cells["test"][c])[i] for c in test_ids])
        fit_rows, test_rows = y_train >= 0, y_test >= 0  # -100: no label for this column
        model = LogisticRegression(max_iter=max_iter).fit(x_train[fit_rows], y_train[fit_rows])
        predicted = model.predict(x_test[test_rows])
        out[head] = {"macro_f1": float(f1_score(y_test[test_rows], predicted, labels=np.unique(y_test[test_rows]),
                                                average="macro", zero_division=0)),
                     "accuracy": float(accuracy_score(y_test[test_rows], predicted)),
                     "train_cells": int(fit_rows.sum()), "test_cells": int(test_rows.sum())}
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["model"] = "sklearn LogisticRegression (lbfgs, L2, C=1) on log1p(counts / total x 1e4), all genes"
    return out
