"""Metrics and plots (PNG) shared by training, fine-tuning and tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curve(points: list[tuple[int, float]], path: str | Path, *, title: str, ylabel: str,
               extra: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """A line plot of (step, value) points, written atomically as PNG."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = {ylabel: points, **(extra or {})}
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def classification_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix, and ROC AUC
    (binary: of the second class; more classes: macro one-vs-rest over the classes present)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

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
    import json

    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    matrix = pd.DataFrame(metrics["confusion_matrix"], index=[f"true {c}" for c in class_names],
                          columns=[f"predicted {c}" for c in class_names])
    files["confusion_csv"] = out / f"{prefix}confusion_matrix.csv"
    matrix.to_csv(files["confusion_csv"].with_suffix(".tmp"))
    files["confusion_csv"].with_suffix(".tmp").replace(files["confusion_csv"])
    files["confusion_png"] = plot_confusion_matrix(np.array(metrics["confusion_matrix"]), class_names,
                                                   out / f"{prefix}confusion_matrix.png",
                                                   title=f"{prefix.rstrip('_') or 'test'}: macro-F1 {metrics['macro_f1']:.3f}")
    if len(class_names) == 2 and true is not None and probabilities is not None and "roc_auc" in metrics:
        files["roc_png"] = plot_roc(true, probabilities[:, 1], out / f"{prefix}roc_curve.png", positive=class_names[1],
                                    auc=metrics["roc_auc"])
    files["metrics_json"] = out / f"{prefix}metrics.json"
    files["metrics_json"].with_suffix(".tmp").write_text(json.dumps(metrics, indent=2) + "\n")
    files["metrics_json"].with_suffix(".tmp").replace(files["metrics_json"])
    return files


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path, *, title: str) -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    plt = _pyplot()
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
    return _save_figure(fig, Path(path))


def plot_roc(true: np.ndarray, scores: np.ndarray, path: str | Path, *, positive: str, auc: float) -> Path:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(true, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC: {positive}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def write_predictions(path: str | Path, *, ids: list[str], probabilities: np.ndarray, class_names: list[str],
                      true: np.ndarray | None = None, id_column: str = "cell_id", extra: dict | None = None) -> Path:
    """Predictions parquet: id, true (when known), predicted, one probability column per class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.asarray(class_names, dtype=object)
    columns = {id_column: pa.array(list(ids), pa.string())}
    columns.update(extra or {})
    if true is not None:
        columns["true"] = pa.array(names[np.asarray(true)].tolist(), pa.string())
    columns["predicted"] = pa.array(names[probabilities.argmax(axis=1)].tolist(), pa.string())
    for i, name in enumerate(class_names):
        columns[f"prob_{name}"] = pa.array(probabilities[:, i].astype(np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(path)
    return path
