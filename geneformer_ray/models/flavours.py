"""Geneformer model flavours (named sizes), building them, and the masked-gene objective.

    model = build_model("gf-6L-10M-i2048")            # BertForMaskedLM, gc30M vocabulary
    objective = MaskedGeneObjective(model)            # forward(...) -> MLM loss at masked positions only

Every flavour is a ``BertForMaskedLM`` with ReLU, absolute positions, LayerNorm eps 1e-12 and pad
id 0; its config records the vocabulary (name + sha256), which ``geneformer_ray.models.folders``
reads back when a saved model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from geneformer_ray.data.vocab import Vocabulary, load_vocab
from geneformer_ray.models.head_loss import linear_cross_entropy
from geneformer_ray.models.packing import packed_hidden

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
# the published models by their short names (Geneformer-V1-10M, -V2-104M, -V2-316M)
FLAVOURS.update({"gf-6L-10M": FLAVOURS["gf-6L-10M-i2048"], "gf-12L-104M": FLAVOURS["gf-12L-104M-i4096"],
                 "gf-18L-316M": FLAVOURS["gf-18L-316M-i4096"]})


def bert_config(flavour: str, vocab: Vocabulary | str | None = None, **overrides):
    """The ``BertConfig`` of a flavour for a vocabulary (default: the flavour's own)."""
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
    config = bert_config(flavour, vocab, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return BertForMaskedLM(config)


def checkpoint_activations(model) -> None:
    """Activation checkpointing (in place): each layer keeps only its input and recomputes the rest in the
    backward pass: activation memory per layer drops from ~34 values per token and width to ~2, for about a
    third more compute. Non-reentrant, so packed rows' keyword arguments pass through."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2; the older name before
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embedding/decoder weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class MaskedGeneObjective(torch.nn.Module):
    """Wraps a ``BertForMaskedLM``; ``forward`` returns the MLM loss with the prediction head applied
    only at masked positions. Wrap this module (not the bare model) in DDP so gradient
    synchronisation sees the forward pass.

    The full head would compute (batch, seq, vocab) logits, 25k wide, for the ~15% of positions
    that count; gathering the masked hidden states first saves most of that compute and memory. On a
    CPU (no autocast) the decoder and the loss run fused (``geneformer_ray.models.head_loss``).
    """

    def __init__(self, model, fused_head: bool | None = None):
        super().__init__()
        self.model = model
        self.fused_head = fused_head  # None: fused on a CPU without autocast (benchmarks force either path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, cu_seqlens=None) -> torch.Tensor:
        """Padded batch: (batch, seq) ids and mask. Packed row (``cu_seqlens`` given, host offsets of its
        cells): (1, tokens) ids and position ids, the mask unused (``geneformer_ray.models.packing``)."""
        if cu_seqlens is None:
            hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = packed_hidden(self.model.bert, input_ids, position_ids, cu_seqlens)
        masked = labels != -100  # (batch, seq)
        states, targets = hidden[masked], labels[masked]  # (n_masked, hidden), (n_masked,)
        head = self.model.cls.predictions
        fused = self.fused_head if self.fused_head is not None else \
            states.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if fused:
            return linear_cross_entropy(head.transform(states), head.decoder.weight, head.decoder.bias, targets)
        return F.cross_entropy(head.decoder(head.transform(states)).float(), targets)  # (n_masked, vocab) logits
