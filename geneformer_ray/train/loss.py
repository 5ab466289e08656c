"""The fine-tuning loss of each task kind, its predictions over a split, and their metrics.

    loss_fn = TaskLoss("cell", {"cell_type": names}, class_weights=None, loss_weights=None, device=device)
    loss = loss_fn(outputs, labels)                  # cross-entropy; -100 labels left out
    record = loss_fn.predictions(outputs, batch)     # ids, true, probabilities (gene: per labelled token)
    metrics = loss_fn.metrics(gathered_records)      # macro-F1 / accuracy / ROC AUC (+ per head, per gene)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from geneformer_ray.train.collate import IGNORE_INDEX as IGNORE
from geneformer_ray.train.evaluate import classification_metrics, write_evaluation, write_predictions


class TaskLoss:
    """Loss, predictions and metrics of one task kind; ``headline`` names the metric to select on."""

    def __init__(self, kind: str, heads: dict, class_weights: dict | None, loss_weights: dict | None, device):
        self.kind, self.heads = kind, heads
        self.weights = {h: torch.tensor(w, dtype=torch.float32, device=device) for h, w in (class_weights or {}).items()}
        self.loss_weights = {h: float((loss_weights or {}).get(h, 1.0)) for h in heads}
        self.headline = "roc_auc" if kind == "gene" else "macro_f1"

    def __call__(self, outputs, labels):
        if self.kind == "multitask":  # labels: (batch, tasks)
            return sum(self.loss_weights[h] * F.cross_entropy(outputs[h].float(), labels[:, i], weight=self.weights.get(h),
                                                              ignore_index=IGNORE)
                       for i, h in enumerate(self.heads))
        (head,) = self.heads
        logits = outputs.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=self.weights.get(head),
                               ignore_index=IGNORE)

    def predictions(self, outputs, batch) -> dict:
        if self.kind == "multitask":
            probs = np.concatenate([torch.softmax(outputs[h].float(), -1).cpu().numpy() for h in self.heads], 1)
            return {"ids": list(batch["cell_id"]), "true": batch["labels"], "probs": probs}
        probs = torch.softmax(outputs.logits.float(), -1).cpu().numpy()
        if self.kind == "cell":
            return {"ids": list(batch["cell_id"]), "true": batch["labels"], "probs": probs}
        rows, cols = np.nonzero(batch["labels"] != IGNORE)  # gene: one record per labelled token
        return {"ids": [batch["cell_id"][r] for r in rows], "true": batch["labels"][rows, cols], "probs": probs[rows, cols],
                "tokens": batch["input_ids"][rows, cols]}

    def task_arrays(self, result: dict):
        """[(head, true, probabilities)] with probabilities split per head for multitask."""
        if self.kind != "multitask":
            (head,) = self.heads
            return [(head, result["true"].astype(np.int64), result["probs"])]
        out, start = [], 0
        for i, (head, names) in enumerate(self.heads.items()):  # probabilities: (cells, all heads' classes)
            true = result["true"][:, i].astype(np.int64)
            block = result["probs"][:, start : start + len(names)]
            start += len(names)
            keep = true != IGNORE
            out.append((head, true[keep], block[keep]))
        return out

    def metrics(self, result: dict) -> dict:
        per_head = {head: classification_metrics(true, probs, self.heads[head]) for head, true, probs in self.task_arrays(result)}
        if self.kind == "multitask":
            merged = {f"{h}_{k}": v for h, m in per_head.items() for k, v in m.items()}
            merged["macro_f1"] = float(np.mean([m["macro_f1"] for m in per_head.values()]))
            merged["accuracy"] = float(np.mean([m["accuracy"] for m in per_head.values()]))
            return merged
        (metrics,) = per_head.values()
        if self.kind == "gene" and len(result["true"]):
            metrics.update(_per_gene_auc(result))
        return metrics


def _per_gene_auc(result: dict) -> dict:
    """Gene-level ROC AUC: each gene's probabilities averaged over the cells it appears in."""
    tokens, true, probs = result["tokens"].astype(np.int64), result["true"].astype(np.int64), result["probs"]
    genes = np.unique(tokens)
    mean_prob = np.array([probs[tokens == g, 1].mean() for g in genes]) if probs.shape[1] == 2 else None
    gene_true = np.array([true[tokens == g][0] for g in genes])
    out = {"num_genes": float(genes.size)}
    if mean_prob is not None and np.unique(gene_true).size == 2:
        out["gene_roc_auc"] = float(roc_auc_score(gene_true, mean_prob))
    return out


def write_test_evaluation(test: dict, metrics: dict, loss_fn: TaskLoss, run_dir: str | Path) -> list[Path]:
    """The test split's predictions and evaluation files under ``run_dir/evaluation`` (per head for multitask)."""
    out = Path(run_dir) / "evaluation"
    files = []
    if loss_fn.kind == "gene":
        head, true, probs = loss_fn.task_arrays(test)[0]
        files.append(write_predictions(out / "test_predictions.parquet", ids=test["ids"], probabilities=probs,
                                       class_names=loss_fn.heads[head], true=true,
                                       extra={"gene_token": test["tokens"].astype(np.int64)}))
        files += write_evaluation(metrics, loss_fn.heads[head], out, prefix="test_", true=true, probabilities=probs).values()
        return files
    ids = np.asarray(test["ids"], dtype=object)
    for i, (head, true, probs) in enumerate(loss_fn.task_arrays(test)):
        prefix = f"test_{head}_" if loss_fn.kind == "multitask" else "test_"
        head_metrics = {k[len(head) + 1:]: v for k, v in metrics.items() if k.startswith(f"{head}_")} \
            if loss_fn.kind == "multitask" else metrics
        keep = test["true"][:, i] != IGNORE if loss_fn.kind == "multitask" else slice(None)
        files.append(write_predictions(out / f"{prefix}predictions.parquet", ids=ids[keep].tolist(), probabilities=probs,
                                       class_names=loss_fn.heads[head], true=true))
        files += write_evaluation(head_metrics, loss_fn.heads[head], out, prefix=prefix, true=true, probabilities=probs).values()
    return files
