"""Attention with fast dropout for CPU training: same law as ``torch.nn.functional.dropout``, ~5x cheaper.

    from geneformer_ray.models.attention import use_sparse_attention_dropout
    use_sparse_attention_dropout(model)     # a BertForMaskedLM / BertForSequenceClassification ...

Geneformer's published models keep attention dropout (0.02 for the V1 flavours). PyTorch's fused CPU
attention kernel has no dropout, so training falls back to the math path, where drawing one
Bernoulli per attention weight ((batch, heads, seq, seq): 48M draws per layer for 12 cells of
1,000 genes) took a quarter of a gf-6L training step on a 2-core CPU. With p = 0.02 only 2% of the
weights are dropped, so ``sparse_dropout`` draws just those: the gaps between dropped positions of
an i.i.d. Bernoulli(p) sequence are Geometric(p), so their running sum gives exactly the dropped
positions, in p*n draws instead of n. Evaluation, zero dropout and non-CPU devices (whose SDPA
kernels fuse dropout) take the stock SDPA path unchanged. The name is process-local: saved models
carry no trace of it and load with stock ``transformers``.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "geneformer_sparse_dropout"


def sparse_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` in distribution: each element zeroed independently with
    probability p, the rest scaled by 1/(1-p). Uses the torch default generator (seeded runs repeat)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} is outside [0, 1)")
    if p == 0.0 or x.numel() == 0:
        return x
    return _SparseDropout.apply(x, p, dropped_positions(x.numel(), p, x.device))


def dropped_positions(n: int, p: float, device) -> torch.Tensor:
    """Positions of the successes of n Bernoulli(p) trials, from Geometric(p) gaps."""
    expected = n * p
    chunks, reached = [], -1
    while reached < n - 1:  # draw gaps until the running position passes the end (almost always one round)
        count = int(expected + 6 * math.sqrt(expected * (1 - p))) + 16
        gaps = torch.empty(count, dtype=torch.float64, device=device).geometric_(p)  # values in {1, 2, ...}
        positions = torch.cumsum(gaps, 0).to(torch.int64) + reached
        chunks.append(positions)
        reached = int(positions[-1])
    dropped = torch.cat(chunks)
    return dropped[dropped < n]


class _SparseDropout(torch.autograd.Function):
    """Scale, then zero the dropped positions in place; the backward pass does the same to the
    gradient (autograd's own index_fill would copy the (batch, heads, seq, seq) tensor twice)."""

    @staticmethod
    def forward(ctx, x, p, dropped):
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(dropped)
        out = x * ctx.scale
        out.view(-1).index_fill_(0, dropped, 0.0)
        return out

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        grad = grad * ctx.scale
        grad.view(-1).index_fill_(0, dropped, 0.0)
        return grad, None, None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs):
    """A ``transformers`` attention function: stock SDPA unless training on CPU with dropout."""
    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(2, 3))  # (batch, heads, seq, seq); scaled on the smaller side
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    # under bf16 autocast the softmax runs in bf16: PyTorch's CPU kernel accumulates in fp32, so its output
    # matches fp32-softmax-then-round in all but ~1e-5 of weights (1 ulp), and the weights are rounded to
    # bf16 for the next matmul anyway
    probs = sparse_dropout(torch.softmax(scores, dim=-1), dropout)
    output = torch.matmul(probs.to(value.dtype), value)  # (batch, heads, seq, head_dim)
    return output.transpose(1, 2).contiguous(), None


def use_sparse_attention_dropout(model) -> None:
    """Switch a ``transformers`` BERT model (in place) to ``attention_forward``."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the same boolean padding mask as SDPA
    model.set_attn_implementation(IMPLEMENTATION)
