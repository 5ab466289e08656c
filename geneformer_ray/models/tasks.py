"""Task models for fine-tuning: one class per task kind, freezing and LoRA.

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

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, BertConfig, BertModel, BertPreTrainedModel

from geneformer_ray.data.vocab import Vocabulary
from geneformer_ray.models.flavours import bert_config


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
    name = TASK_MODELS[kind]
    return BertForMultitaskCellClassification if kind == "multitask" else getattr(transformers, name)


def task_config_kwargs(kind: str, heads: dict[str, list[str]]) -> dict:
    if kind == "multitask":
        return {"task_classes": heads}
    (names,) = heads.values()
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def check_head(kind: str, heads: dict[str, list[str]], init_from: str | Path) -> None:
    """Refuse a checkpoint whose task head does not fit this task (before any worker starts)."""
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


def freeze_layers(model, num_layers: int, *, embeddings: bool = False) -> int:
    """Freeze the embeddings and the first ``num_layers`` encoder layers (``embeddings``: the embeddings
    even when ``num_layers`` is 0); returns parameters frozen."""
    if num_layers == 0 and not embeddings:
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
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=head_module_names(model, kind))
    return get_peft_model(model, config)


def merge_lora(model):
    """A plain transformers model with the adapters merged into its weights (no-op without LoRA)."""
    model = getattr(model, "module", model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
