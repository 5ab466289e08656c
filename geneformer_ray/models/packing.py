"""The encoder over packed rows: cells laid end to end, positions restarting at each cell, attention
confined to each cell (``geneformer_ray.models.attention``).

    batch = pack_cells(cells, pad_id=0, multiple=64)      # geneformer_ray.train.collate: numpy
    hidden = packed_hidden(model.bert, input_ids, position_ids, batch["cu_seqlens"])   # (1, tokens, hidden)
    vectors = segment_mean(hidden[0], batch["cu_seqlens"], gene_mask)                  # (cells, hidden)

A padded batch of n cells spends (n x longest) positions on every linear layer and n x longest^2 on
attention; a packed row spends sum(lengths) and sum(length^2). The model must use
``use_geneformer_attention`` (the layers hand the cell offsets to its attention function).
"""

from __future__ import annotations

import numpy as np
import torch

from geneformer_ray.models.attention import IMPLEMENTATION, varlen_kernel

ON_OFF = ("auto", "on", "off")  # data.packing, embed / perturb --packing, optim.fused


def on_off(value):
    """YAML reads on/off as booleans: back to the words."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


def packing_enabled(setting: str) -> bool:
    """Whether cells travel as packed rows. ``auto`` packs: measured faster wherever it has run
    (``benchmarks/pretrain_bench.py``, 2-core CPU: gf-6L-10M pretraining 1.25x through Ray Train, the model
    step 1.4-1.5x for gf-6L-10M / gf-12L-104M / gf-18L-316M; cell embeddings 1.4x), and on CUDA and NPU it
    is what the varlen kernels are for. The quickstart opts out: its 256-gene cells leave nothing to pad."""
    if setting not in ON_OFF:
        raise ValueError(f"packing={setting!r}: use {', '.join(ON_OFF)}")
    return setting != "off"


def packed_copies(setting: str, device_type: str, autocast_dtype: str | None) -> bool:
    """Whether in-silico perturbation runs each sub-batch of perturbed copies as one packed row. ``auto`` packs where
    attention over packed rows has a fused varlen kernel (CUDA and NPU in bf16: ``varlen_kernel``): there a padded
    sub-batch (widths rounded up to 64) carries a mask, which keeps attention off the flash kernels. On a CPU the
    copies of a length-sorted sub-batch leave little padding, and attention one copy at a time measured 8% slower
    than the padded batch (V1-10M shapes, cells of 97-230 genes, fp32; the same shifts to 2e-7)."""
    if not packing_enabled(setting):
        return False
    dtype = getattr(torch, autocast_dtype) if autocast_dtype else torch.float32
    return setting == "on" or varlen_kernel(device_type, dtype) in ("flash", "npu_tnd")


def packed_hidden(bert, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens, *,
                  num_layers: int | None = None) -> torch.Tensor:
    """(1, tokens, hidden): a ``BertModel``'s token states over one packed row.

    ``input_ids``/``position_ids``: (1, tokens) on the model's device; ``cu_seqlens``: (cells + 1,) host
    offsets (numpy or list) covering every token. ``num_layers`` runs only the first layers (None: all)."""
    if bert.config._attn_implementation != IMPLEMENTATION:
        raise ValueError("packed rows need the model switched to geneformer_ray's attention first: "
                         "geneformer_ray.models.attention.use_geneformer_attention(model)")
    offsets = np.asarray(cu_seqlens, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != input_ids.size(1) or np.any(np.diff(offsets) < 1):
        raise ValueError(f"cu_seqlens must rise from 0 to the row's {input_ids.size(1)} tokens in steps of at least "
                         f"1; got {offsets[:4].tolist()} ... {offsets[-2:].tolist()}")
    kwargs = {"cu_seq_lens_q": torch.as_tensor(offsets, dtype=torch.int32).to(input_ids.device, non_blocking=True),
              "max_length_q": int(np.diff(offsets).max()), "host_cu_seq_lens": offsets.tolist()}  # once, not per layer
    kwargs.update(cu_seq_lens_k=kwargs["cu_seq_lens_q"], max_length_k=kwargs["max_length_q"])
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids))
    for layer in bert.encoder.layer[:num_layers]:
        hidden = layer(hidden, None, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def segment_ids(cu_seqlens, device=None) -> torch.Tensor:
    """(tokens,) the cell number of each token of a packed row."""
    lengths = torch.as_tensor(np.diff(np.asarray(cu_seqlens, dtype=np.int64)), device=device)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)


def segment_mean(hidden: torch.Tensor, cu_seqlens, weights: torch.Tensor) -> torch.Tensor:
    """(cells, hidden): the mean of each cell's token states where ``weights`` (tokens,) is true."""
    cells = segment_ids(cu_seqlens, hidden.device)
    w = weights.to(hidden.dtype)
    n = len(cu_seqlens) - 1
    sums = torch.zeros(n, hidden.size(-1), dtype=hidden.dtype, device=hidden.device).index_add_(0, cells, hidden * w[:, None])
    counts = torch.zeros(n, dtype=hidden.dtype, device=hidden.device).index_add_(0, cells, w)
    return sums / counts.clamp_min(1.0)[:, None]
