"""Geneformer's attention: fast dropout for CPU training, and attention confined to each cell of a packed row.

    from geneformer_ray.models.attention import use_geneformer_attention
    use_geneformer_attention(model, sparse_dropout=True)   # a BertForMaskedLM / BertForSequenceClassification ...

**Sparse dropout.** Geneformer's published models keep attention dropout (0.02 for the V1 flavours, 0.1 for
V2). PyTorch's fused CPU attention kernel has no dropout, so training falls back to the math path, where
drawing one Bernoulli per attention weight ((batch, heads, seq, seq): 48M draws per layer for 12 cells of
1,000 genes) took a quarter of a gf-6L training step on a 2-core CPU. With p = 0.02 only 2% of the
weights are dropped, so ``sparse_dropout`` draws just those: the gaps between dropped positions of
an i.i.d. Bernoulli(p) sequence are Geometric(p), so their running sum gives exactly the dropped
positions, in p*n draws instead of n. Evaluation, zero dropout and non-CPU devices (whose SDPA
kernels fuse dropout) take the stock SDPA path unchanged.

**Packed rows** (``geneformer_ray.models.packing``): when the layer is called with ``cu_seq_lens_q`` (the
cumulative cell lengths of a row of cells laid end to end), each token attends only to its own cell.
``varlen_kernel`` picks how, from the device and dtype alone: on CUDA in bf16/fp16 PyTorch's flash-attention
varlen kernel (dropout included); on an NPU torch_npu's fused attention in the TND layout; otherwise (CPU,
fp32 on an accelerator) a correct fallback that gathers the cells into a padded block, runs one masked
attention call and scatters the result back. Implementation names are process-local: saved models carry no
trace of them and load with stock ``transformers``.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "geneformer"
KERNELS = ("flash", "npu_tnd", "looped", "padded")  # what ``varlen_kernel`` may choose for packed rows


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
    """A ``transformers`` attention function: packed rows confined to their cells, sparse dropout when training
    on CPU with dropout (and the module allows it), stock SDPA otherwise."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    if kwargs.get("cu_seq_lens_q") is not None:
        return varlen_attention(query, key, value, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], dropout=dropout,
                                scaling=scaling, sparse=getattr(module, "sparse_dropout", False),
                                host_offsets=kwargs.get("host_cu_seq_lens"))
    if dropout == 0.0 or query.device.type != "cpu" or not getattr(module, "sparse_dropout", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return math_attention(query, key, value, attention_mask, dropout, scaling).transpose(1, 2).contiguous(), None


def math_attention(query, key, value, attention_mask, dropout: float, scaling: float) -> torch.Tensor:
    """(batch, heads, seq, head_dim): softmax attention written out, with sparse dropout on the weights."""
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
    return torch.matmul(probs.to(value.dtype), value)


def varlen_kernel(device_type: str, dtype: torch.dtype) -> str:
    """Which attention a packed row takes: ``flash`` (CUDA, bf16/fp16), ``npu_tnd`` (NPU, bf16/fp16),
    ``looped`` (CPU: one unmasked attention call per cell, where calls cost no kernel launch) or ``padded``
    (an accelerator in fp32: flash kernels have no fp32 form)."""
    half = dtype in (torch.bfloat16, torch.float16)
    if device_type == "cuda" and half:
        return "flash"
    if device_type == "npu" and half:
        return "npu_tnd"
    return "looped" if device_type == "cpu" else "padded"


def varlen_attention(query, key, value, cu_seq_lens, max_length: int, *, dropout: float, scaling: float,
                     sparse: bool = False, host_offsets=None):
    """Attention within cells of packed rows. ``query``/``key``/``value``: (1, heads, tokens, head_dim);
    ``cu_seq_lens``: (cells + 1,) int32 offsets covering every token (a padding tail is a cell of its own);
    ``max_length``: the longest cell. Returns ((1, tokens, heads, head_dim), None) like every attention function."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    kernel = varlen_kernel(q.device.type, q.dtype)
    if kernel == "flash":
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length,
                                                       dropout, False, False, scale=scaling)[0]
    elif kernel == "npu_tnd":
        out = _npu_tnd(q, k, v, cu_seq_lens.tolist() if host_offsets is None else host_offsets, dropout=dropout,
                       scaling=scaling)
    elif kernel == "looped":
        out = looped_varlen(q, k, v, cu_seq_lens.tolist() if host_offsets is None else host_offsets, dropout=dropout,
                            scaling=scaling, sparse=sparse)
    else:
        out = padded_varlen(q, k, v, cu_seq_lens, max_length, dropout=dropout, scaling=scaling, sparse=sparse)
    return out.unsqueeze(0), None


def _npu_tnd(q, k, v, offsets, *, dropout: float, scaling: float):
    """torch_npu's fused attention over cells laid end to end (TND layout: cumulative ends, no leading 0)."""
    import torch_npu  # the NPU seam: this branch runs only on an NPU tensor, where torch_npu is loaded

    ends = [int(x) for x in offsets][1:]
    return torch_npu.npu_fusion_attention(q, k, v, q.size(1), "TND", scale=scaling, keep_prob=1.0 - dropout,
                                          actual_seq_qlen=ends, actual_seq_kvlen=ends)[0]


def looped_varlen(q, k, v, offsets, *, dropout: float, scaling: float, sparse: bool = False):
    """CPU: each cell's own attention, unmasked (the fused kernel when there is no dropout; sparse dropout
    on the written-out path when there is), concatenated back to (tokens, heads, head_dim)."""
    bounds = [int(x) for x in offsets]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, length, head_dim)
        if sparse and dropout > 0.0:
            out = math_attention(qs, ks, vs, None, dropout, scaling)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def padded_varlen(q, k, v, cu_seq_lens, max_length: int, *, dropout: float, scaling: float, sparse: bool = False):
    """The fallback: the cells gathered into a (cells, heads, longest, head_dim) block, one attention call with
    each cell's keys masked to its own length, the result scattered back to (tokens, heads, head_dim)."""
    offsets = cu_seq_lens.to(torch.long)
    lengths = offsets[1:] - offsets[:-1]  # (cells,)
    steps = torch.arange(max_length, device=q.device)
    valid = steps < lengths[:, None]  # (cells, longest)
    index = (offsets[:-1, None] + steps).clamp_max(q.size(0) - 1)  # past a cell's end: any token, masked below
    qp, kp, vp = (t[index].transpose(1, 2) for t in (q, k, v))  # (cells, heads, longest, head_dim)
    mask = valid[:, None, None, :]
    if sparse and dropout > 0.0 and q.device.type == "cpu":
        out = math_attention(qp, kp, vp, mask, dropout, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)[valid]  # (tokens, heads, head_dim), in the packed order


def use_geneformer_attention(model, *, sparse_dropout: bool = True) -> None:
    """Switch a ``transformers`` BERT model (in place) to ``attention_forward``: packed rows work, and CPU
    training with attention dropout draws it sparsely when ``sparse_dropout``."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the same boolean padding mask as SDPA
    model.set_attn_implementation(IMPLEMENTATION)
    for module in model.modules():
        if hasattr(module, "attention_head_size"):  # BertSelfAttention
            module.sparse_dropout = sparse_dropout
