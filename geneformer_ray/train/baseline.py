"""The baseline every cell-classification figure stands next to: logistic regression on log-normalised counts.

    result = logistic_regression_baseline(manifest, split_cells, heads, corpus=corpus)   # same cells, same split

Counts come from the corpus's source files (recorded in its manifest), normalised to 10,000 counts
per cell and log1p-transformed (the scanpy default), fitted on the training cells of the split and
scored on its test cells with the same metrics as the fine-tuned model. With ``corpus`` a second
model reads what the fine-tuned model reads: which genes are among the cell's tokens (a cell cut at
its top 256 genes shows that much and no more), the ceiling a linear reader of the same input reaches.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from geneformer_ray.data.corpus import read_columns


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


def token_genes(corpus, cell_ids: list[str], vocab_size: int) -> sp.csr_matrix:
    """(cells, vocabulary) 1 where the token is among the cell's tokens, in the order of ``cell_ids``."""
    table = read_columns(corpus, ["cell_id", "input_ids"], cell_ids=cell_ids)
    row_of = {c: i for i, c in enumerate(table.column("cell_id").to_pylist())}
    order = np.array([row_of[c] for c in cell_ids])
    tokens = table.column("input_ids").combine_chunks()
    offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    bag = sp.csr_matrix((np.ones(values.size), (rows, values)), shape=(len(offsets) - 1, vocab_size))
    bag.data[:] = 1.0  # a token twice (V2's specials never are) still counts once
    return bag[order]


def logistic_regression_baseline(manifest: dict, cells: dict[str, dict], heads: dict[str, list[str]], *,
                                 corpus=None, vocab_size: int | None = None, max_iter: int = 2000) -> dict:
    """Per label column: test macro-F1 and accuracy of logistic regression fitted on the training cells
    (and, with ``corpus`` and ``vocab_size``, ``same_genes_*``: fitted on which genes the cell's tokens hold)."""
    started = time.perf_counter()
    train_ids, test_ids = list(cells["train"]), list(cells["test"])
    inputs = {"": log_normalised_counts(manifest, train_ids + test_ids)}
    if corpus is not None:
        inputs["same_genes_"] = token_genes(corpus, train_ids + test_ids, vocab_size)
    out = {}
    for i, (head, classes) in enumerate(heads.items()):
        y_train = np.array([np.atleast_1d(cells["train"][c])[i] for c in train_ids])
        y_test = np.array([np.atleast_1d(cells["test"][c])[i] for c in test_ids])
        fit_rows, test_rows = y_train >= 0, y_test >= 0  # -100: no label for this column
        out[head] = {"train_cells": int(fit_rows.sum()), "test_cells": int(test_rows.sum())}
        for prefix, features in inputs.items():
            x_train, x_test = features[: len(train_ids)], features[len(train_ids):]
            model = LogisticRegression(max_iter=max_iter).fit(x_train[fit_rows], y_train[fit_rows])
            predicted = model.predict(x_test[test_rows])
            out[head][f"{prefix}macro_f1"] = float(f1_score(y_test[test_rows], predicted, labels=np.unique(y_test[test_rows]),
                                                            average="macro", zero_division=0))
            out[head][f"{prefix}accuracy"] = float(accuracy_score(y_test[test_rows], predicted))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["model"] = "sklearn LogisticRegression (lbfgs, L2, C=1) on log1p(counts / total x 1e4), all genes" + \
        ("; same_genes_*: on which vocabulary genes are among the cell's tokens (the model's input)" if corpus is not None else "")
    return out
