"""Classification metrics and the evaluation files of a fine-tuned model: predictions parquet, confusion
matrix (CSV + PNG), ROC curve, metrics JSON; every file written atomically.

    metrics = classification_metrics(true, probabilities, class_names)
    files = write_evaluation(metrics, class_names, "runs/finetune/evaluation", prefix="test_")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score, roc_curve

from geneformer_ray.files import atomic_file, write_json
from geneformer_ray.plots import pyplot, save_figure


def classification_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix, and ROC AUC
    (binary: of the second class; more classes: macro one-vs-rest over the classes present)."""
    true = np.asarray(true)
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=labels, zero_division=0)
    present = np.unique(true)
    metrics = {
        "accuracy": float((predicted == true).mean()) if true.size else float("nan"),
        "macro_f1": float(f1_score(true, predicted, labels=present, average="macro", zero_division=0)) if true.size else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(true, predicted, labels=labels).tolist(),
        "num_examples": int(true.size),
    }
    if len(class_names) == 2 and present.size == 2:
        metrics["roc_auc"] = float(roc_auc_score(true, probabilities[:, 1]))
    elif present.size > 2:
        probs = probabilities[:, present] / probabilities[:, present].sum(axis=1, keepdims=True)
        metrics["roc_auc"] = float(roc_auc_score(true, probs, multi_class="ovr", labels=present))
    return metrics


def write_evaluation(metrics: dict, class_names: list[str], out: str | Path, *, prefix: str = "",
                     true: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> dict[str, Path]:
    """Confusion matrix (CSV + PNG), metrics JSON, and for two classes the ROC curve PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    matrix = pd.DataFrame(metrics["confusion_matrix"], index=[f"true {c}" for c in class_names],
                          columns=[f"predicted {c}" for c in class_names])
    files["confusion_csv"] = out / f"{prefix}confusion_matrix.csv"
    with atomic_file(files["confusion_csv"]) as tmp:
        matrix.to_csv(tmp)
    files["confusion_png"] = plot_confusion_matrix(np.array(metrics["confusion_matrix"]), class_names,
                                                   out / f"{prefix}confusion_matrix.png",
                                                   title=f"{prefix.rstrip('_') or 'test'}: macro-F1 {metrics['macro_f1']:.3f}")
    if len(class_names) == 2 and true is not None and probabilities is not None and "roc_auc" in metrics:
        files["roc_png"] = plot_roc(true, probabilities[:, 1], out / f"{prefix}roc_curve.png", positive=class_names[1],
                                    auc=metrics["roc_auc"])
    files["metrics_json"] = out / f"{prefix}metrics.json"
    write_json(files["metrics_json"], metrics)
    return files


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path, *, title: str) -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    plt = pyplot()
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=120)
    rates = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i, j]:,}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(true: np.ndarray, scores: np.ndarray, path: str | Path, *, positive: str, auc: float) -> Path:
    plt = pyplot()
    fpr, tpr, _ = roc_curve(true, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC: {positive}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def write_predictions(path: str | Path, *, ids: list[str], probabilities: np.ndarray, class_names: list[str],
                      true: np.ndarray | None = None, id_column: str = "cell_id", extra: dict | None = None) -> Path:
    """Predictions parquet: id, true (when known), predicted, one probability column per class."""
    names = np.asarray(class_names, dtype=object)
    columns = {id_column: pa.array(list(ids), pa.string())}
    columns.update(extra or {})
    if true is not None:
        columns["true"] = pa.array(names[np.asarray(true)].tolist(), pa.string())
    columns["predicted"] = pa.array(names[probabilities.argmax(axis=1)].tolist(), pa.string())
    for i, name in enumerate(class_names):
        columns[f"prob_{name}"] = pa.array(probabilities[:, i].astype(np.float32))
    with atomic_file(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return Path(path)
