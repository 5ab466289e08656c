"""Fine-tuning tasks: labels from the corpus, gene classes from lists, task models, freezing and LoRA.

    classes = read_gene_classes("dosage_sens_tf_labels.csv")          # {ENSG: class}
    model = build_task_model("cell", {"cell_type": names}, init_from="runs/quickstart/model")
    freeze_layers(model, 2); model = add_lora(model, rank=8, ...); plain = merge_lora(model)

Three task kinds, one model class each, all saved in Hugging Face format:
  cell       ``BertForSequenceClassification`` (pooler on the first token, as Geneformer)
  gene       ``BertForTokenClassification`` (loss only at tokens of labelled genes)
  multitask  ``BertForMultitaskCellClassification``: one encoder initialised from the checkpoint
             (Geneformer's own multitask code starts from a random encoder), one linear head per
             label column on the mean of the cell's token states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel

from geneformer_ray.collate import IGNORE_INDEX as IGNORE
from geneformer_ray.vocab import Vocabulary


# -- labels -----------------------------------------------------------------------------------------
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
    import pandas as pd

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


# -- models -----------------------------------------------------------------------------------------
class BertForMultitaskCellClassification(BertPreTrainedModel):
    """One BERT encoder, one linear head per task on the mean of the cell's (non-pad) token states.

    ``config.task_classes`` = {task: [class names]}; ``forward`` returns {task: logits (batch, classes)}.
    Loads an MLM checkpoint's encoder (the ``bert.`` weights) and starts the heads fresh.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.heads = nn.ModuleDict({task: nn.Linear(config.hidden_size, len(names))
                                    for task, names in config.task_classes.items()})
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> dict[str, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, hidden)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = self.dropout((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))  # (batch, hidden)
        return {task: head(pooled) for task, head in self.heads.items()}


TASK_MODELS = {"cell": "BertForSequenceClassification", "gene": "BertForTokenClassification",
               "multitask": "BertForMultitaskCellClassification"}


def model_class(kind: str):
    import transformers

    name = TASK_MODELS[kind]
    return BertForMultitaskCellClassification if kind == "multitask" else getattr(transformers, name)


def task_config_kwargs(kind: str, heads: dict[str, list[str]]) -> dict:
    if kind == "multitask":
        return {"task_classes": heads}
    (names,) = heads.values()
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def check_head(kind: str, heads: dict[str, list[str]], init_from: str | Path) -> None:
    """Refuse a checkpoint whose task head does not fit this task (before any worker starts)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(init_from, local_files_only=True)
    architecture = (config.architectures or ["BertForMaskedLM"])[0]
    if architecture in ("BertForMaskedLM", "BertForPreTraining", "BertModel"):
        return  # a pretrained encoder: the head starts fresh
    if kind == "multitask":
        saved = getattr(config, "task_classes", None)
        if architecture != TASK_MODELS[kind] or saved != heads:
            raise ValueError(f"model.init_from={init_from} is a {architecture} with heads {saved}, not this task's {heads}; "
                             "start from the pretrained encoder instead")
        return
    (names,) = heads.values()
    if architecture != TASK_MODELS[kind] or config.num_labels != len(names):
        raise ValueError(f"model.init_from={init_from} is a {architecture} with {config.num_labels} labels; this {kind} task has "
                         f"{len(names)} ({', '.join(names[:5])}); start from the pretrained encoder or match the labels")


def build_task_model(kind: str, heads: dict[str, list[str]], *, init_from: str | None = None, flavour: str = "tiny",
                     vocab: Vocabulary | str | None = None, seed: int = 0, hidden_dropout: float | None = None,
                     attention_dropout: float | None = None):
    """The task's model from a checkpoint folder (encoder loaded, head fresh) or from scratch."""
    from geneformer_ray.models import bert_config

    cls = model_class(kind)
    overrides = task_config_kwargs(kind, heads)
    if hidden_dropout is not None:
        overrides["hidden_dropout_prob"] = hidden_dropout
    if attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = attention_dropout
    torch.manual_seed(seed)
    if init_from is None:
        return cls(bert_config(flavour, vocab, **overrides))
    config = BertConfig.from_pretrained(init_from, local_files_only=True)
    for key, value in overrides.items():  # set on the config: transformers hands unknown keywords to __init__
        setattr(config, key, value)
    return cls.from_pretrained(init_from, config=config, local_files_only=True)


def freeze_layers(model, num_layers: int) -> int:
    """Freeze the embeddings and the first ``num_layers`` encoder layers; returns parameters frozen."""
    if num_layers == 0:
        return 0
    encoder = model.bert
    if num_layers > len(encoder.encoder.layer):
        raise ValueError(f"model.freeze_layers={num_layers} exceeds the model's {len(encoder.encoder.layer)} layers")
    frozen = 0
    for module in [encoder.embeddings, *encoder.encoder.layer[:num_layers]]:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def head_module_names(model, kind: str) -> list[str]:
    """Modules that are new for the task and train fully under LoRA (peft matches name suffixes)."""
    if kind == "multitask":
        return [f"heads.{task}" for task in model.heads]
    return ["classifier", "pooler"] if kind == "cell" else ["classifier"]


def add_lora(model, kind: str, *, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap in peft LoRA adapters: only adapters and the task head train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - peft is a dependency
        raise ValueError("model.lora_rank > 0 needs the peft package (pip install peft)") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=head_module_names(model, kind))
    return get_peft_model(model, config)


def merge_lora(model):
    """A plain transformers model with the adapters merged into its weights (no-op without LoRA)."""
    model = getattr(model, "module", model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# -- loss, predictions, metrics ---------------------------------------------------------------------
class TaskLoss:
    """Loss, predictions and metrics of one task kind; ``headline`` names the metric to select on."""

    def __init__(self, kind: str, heads: dict, class_weights: dict | None, loss_weights: dict | None, device):
        import torch

        self.kind, self.heads = kind, heads
        self.weights = {h: torch.tensor(w, dtype=torch.float32, device=device) for h, w in (class_weights or {}).items()}
        self.loss_weights = {h: float((loss_weights or {}).get(h, 1.0)) for h in heads}
        self.headline = "roc_auc" if kind == "gene" else "macro_f1"

    def __call__(self, outputs, labels):
        import torch.nn.functional as F

        if self.kind == "multitask":  # labels: (batch, tasks)
            return sum(self.loss_weights[h] * F.cross_entropy(outputs[h].float(), labels[:, i], weight=self.weights.get(h),
                                                              ignore_index=IGNORE)
                       for i, h in enumerate(self.heads))
        (head,) = self.heads
        logits = outputs.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=self.weights.get(head),
                               ignore_index=IGNORE)

    def predictions(self, outputs, batch) -> dict:
        import torch

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
        from geneformer_ray.evaluate import classification_metrics

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
    from sklearn.metrics import roc_auc_score

    tokens, true, probs = result["tokens"].astype(np.int64), result["true"].astype(np.int64), result["probs"]
    genes = np.unique(tokens)
    mean_prob = np.array([probs[tokens == g, 1].mean() for g in genes]) if probs.shape[1] == 2 else None
    gene_true = np.array([true[tokens == g][0] for g in genes])
    out = {"num_genes": float(genes.size)}
    if mean_prob is not None and np.unique(gene_true).size == 2:
        out["gene_roc_auc"] = float(roc_auc_score(gene_true, mean_prob))
    return out


def write_test_evaluation(test: dict, metrics: dict, loss_fn: TaskLoss, config: dict) -> list[Path]:
    from geneformer_ray.evaluate import write_evaluation, write_predictions

    out = Path(config["run_dir"]) / "evaluation"
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
