"""Geneformer model flavours: build, load, save (Hugging Face format), vocabulary checks, MLM loss.

    from geneformer_ray.models import build_model, save_model, load_model
    model = build_model("gf-6L-10M-i2048")            # BertForMaskedLM, gc30M vocabulary
    save_model(model, "out/model", vocab="gc30M")       # config.json + model.safetensors
    model, vocab_name = load_model("path/to/Geneformer-V2-104M")

Every flavour is a ``BertForMaskedLM`` with ReLU, absolute positions, LayerNorm eps 1e-12 and pad
id 0. Saved models carry their vocabulary (name + sha256) in ``config.json``; stock
``transformers.BertForMaskedLM.from_pretrained`` ignores the extra keys and loads them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from geneformer_ray.vocab import Vocabulary, load_vocab

VOCAB_NAME_KEY = "geneformer_vocab_name"
VOCAB_HASH_KEY = "geneformer_vocab_sha256"


@dataclass(frozen=True)
class Flavour:
    """A named model size; ``vocab`` is its default vocabulary (the one it was published with)."""

    vocab: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    dropout: float
    attention_dropout: float | None = None  # default: dropout


FLAVOURS: dict[str, Flavour] = {
    # tiny: tests and the quickstart; no attention dropout keeps CPU attention on the fused kernel (~2x)
    "tiny": Flavour("gc30M", num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, dropout=0.02,
                    attention_dropout=0.0),
    "gf-6L-10M-i2048": Flavour("gc30M", 6, 256, 4, 512, 0.02),
    "gf-12L-40M-i2048": Flavour("gc30M", 12, 512, 8, 1024, 0.02),
    "gf-12L-38M-i4096": Flavour("gc104M", 12, 512, 8, 1024, 0.02),
    "gf-20L-151M-i4096": Flavour("gc104M", 20, 896, 14, 1792, 0.02),
    "gf-12L-104M-i4096": Flavour("gc104M", 12, 768, 12, 3072, 0.1),
    "gf-18L-316M-i4096": Flavour("gc104M", 18, 1152, 18, 4608, 0.1),
}


def bert_config(flavour: str, vocab: Vocabulary | str | None = None, **overrides):
    """The ``BertConfig`` of a flavour for a vocabulary (default: the flavour's own)."""
    from transformers import BertConfig

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown model flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    spec = FLAVOURS[flavour]
    vocab = load_vocab(vocab or spec.vocab)
    settings = dict(
        vocab_size=vocab.num_tokens, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=vocab.model_input_size, hidden_act="relu", layer_norm_eps=1e-12,
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout if spec.attention_dropout is None else spec.attention_dropout,
        initializer_range=0.02,
        type_vocab_size=2, pad_token_id=vocab.pad_id, position_embedding_type="absolute",
        **{VOCAB_NAME_KEY: vocab.name, VOCAB_HASH_KEY: vocab.sha256, "geneformer_flavour": flavour},
    )
    settings.update(overrides)
    return BertConfig(**settings)


def build_model(flavour: str, vocab: Vocabulary | str | None = None, *, seed: int | None = None, **overrides):
    """A freshly initialised ``BertForMaskedLM`` of the flavour."""
    from transformers import BertForMaskedLM

    config = bert_config(flavour, vocab, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return BertForMaskedLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embedding/decoder weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_vocab(config, vocab: Vocabulary | str | None = None) -> Vocabulary:
    """The vocabulary a model was trained with: recorded in its config, or told, or known by size.

    Published Geneformer checkpoints record nothing; their vocabulary size identifies them
    (25,426: gc30M; 20,275: gc104M).
    """
    recorded = getattr(config, VOCAB_HASH_KEY, None)
    if vocab is not None:
        vocab = load_vocab(vocab)
        if recorded and recorded != vocab.sha256:
            raise ValueError(
                f"the model was trained with vocabulary {getattr(config, VOCAB_NAME_KEY, '?')} (sha256 {recorded[:12]}), "
                f"not {vocab.name} (sha256 {vocab.sha256[:12]}); pass the model's own vocabulary"
            )
    elif recorded:
        name = getattr(config, VOCAB_NAME_KEY, None)
        vocab = load_vocab(name) if name in ("gc30M", "gc104M") else None
        if vocab is None or vocab.sha256 != recorded:
            raise ValueError(f"the model's vocabulary {name} (sha256 {recorded[:12]}) is not a preset; pass vocab=PATH")
    else:
        by_size = {load_vocab(v).num_tokens: v for v in ("gc30M", "gc104M")}
        if config.vocab_size not in by_size:
            raise ValueError(f"a model with {config.vocab_size:,} tokens matches no preset vocabulary; pass vocab=PATH")
        vocab = load_vocab(by_size[config.vocab_size])
    if config.vocab_size != vocab.num_tokens:
        raise ValueError(f"the model has {config.vocab_size:,} token embeddings but vocabulary {vocab.name} has {vocab.num_tokens:,}")
    return vocab


def load_model(path: str | Path, *, vocab: Vocabulary | str | None = None, model_class=None, **kwargs):
    """Load a checkpoint folder (ours or a published Geneformer one: ``config.json`` + ``model.safetensors``
    or ``pytorch_model.bin``). Returns ``(model, vocabulary)``. No network access: a path only; ``kwargs``
    go to ``from_pretrained``."""
    from transformers import AutoConfig, BertForMaskedLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a model folder (no config.json); pass a folder saved by geneformer-ray or a Geneformer checkpoint")
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ValueError(f"{path} has a config.json but no model.safetensors or pytorch_model.bin")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    vocab = model_vocab(config, vocab)
    model = (model_class or BertForMaskedLM).from_pretrained(path, local_files_only=True, **kwargs)
    return model, vocab


def save_model(model, path: str | Path, *, vocab: Vocabulary | str) -> Path:
    """Save in Hugging Face format (safetensors) with the vocabulary recorded in config.json."""
    vocab = load_vocab(vocab)
    model_vocab(model.config, vocab)  # refuses saving under a vocabulary the model does not have
    setattr(model.config, VOCAB_NAME_KEY, vocab.name)
    setattr(model.config, VOCAB_HASH_KEY, vocab.sha256)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(path, safe_serialization=True)
    (path / "geneformer_vocab.json").write_text(json.dumps(vocab.describe(), indent=2) + "\n")
    return path


def check_corpus_vocab(model_or_config, manifest: dict, *, corpus: str | Path = "corpus") -> None:
    """Refuse to train or infer on a corpus tokenized with another vocabulary than the model's."""
    from geneformer_ray.corpus import check_vocab

    config = getattr(model_or_config, "config", model_or_config)
    check_vocab(manifest, model_vocab(config), corpus=corpus)


class MaskedGeneObjective(torch.nn.Module):
    """Wraps a ``BertForMaskedLM``; ``forward`` returns the MLM loss with the prediction head applied
    only at masked positions. Wrap this module (not the bare model) in DDP so gradient
    synchronisation sees the forward pass.

    The full head would compute (batch, seq, vocab) logits, 25k wide, for the ~15% of positions
    that count; gathering the masked hidden states first saves most of that compute and memory.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, hidden)
        masked = labels != -100  # (batch, seq)
        logits = self.model.cls(hidden[masked])  # (n_masked, vocab)
        return F.cross_entropy(logits.float(), labels[masked])


def publish_model(model_dir: str | Path, target: Path) -> Path:
    """Copy a model folder to a fixed path (checkpoint folder names change every run), atomically."""
    import shutil

    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
