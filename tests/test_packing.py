"""Ring 1-2: sequence packing. A packed row (cells end to end, positions restarting, attention within each
cell) gives the padded computation's MLM loss, gradients and cell embeddings; the kernel and the default
are chosen from the device; a pretraining epoch on packed rows trains on every cell once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geneformer_ray.data.vocab import load_vocab
from geneformer_ray.infer.encoder import CellEncoder
from geneformer_ray.models.attention import looped_varlen, padded_varlen, use_geneformer_attention, varlen_kernel
from geneformer_ray.models.flavours import MaskedGeneObjective, build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.models.packing import packed_hidden, packing_enabled, segment_mean
from geneformer_ray.train.collate import IGNORE_INDEX, GeneMasker, pack_cells, packed_batches, pad_cells


def _real_cells(corpus: Path, n: int, *, seed: int = 0) -> list[np.ndarray]:
    """n real PBMC3k cells of varied lengths (the first shard's), as token arrays."""
    table = pq.read_table(sorted(corpus.glob("part-*.parquet"))[0], columns=["input_ids"])
    cells = [np.asarray(c, dtype=np.int64) for c in table.column("input_ids").to_pylist()]
    pick = np.random.default_rng(seed).choice(len(cells), n, replace=False)
    return [cells[i] for i in pick]


def test_pack_cells_lays_cells_end_to_end_with_positions_restarting():
    cells = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    row = pack_cells(cells, pad_id=0, multiple=4)
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]  # the padding tail is a segment too
    assert row["cu_seqlens"].tolist() == [0, 3, 4, 6, 8] and row["cu_seqlens"].dtype == np.int32
    assert row["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]] and row["num_cells"] == 3
    exact = pack_cells(cells, pad_id=0, multiple=1)
    assert exact["cu_seqlens"].tolist() == [0, 3, 4, 6] and exact["input_ids"].shape == (1, 6)


def test_packed_batches_keep_order_and_budget():
    lengths = np.array([5, 9, 3, 7, 2, 8])
    assert [b.tolist() for b in packed_batches(lengths, batch_size=4)] == [[0, 1, 2, 3], [4, 5]]
    budget = packed_batches(lengths, max_tokens=12)
    assert [b.tolist() for b in budget] == [[0], [1, 2], [3, 4], [5]]
    assert all(lengths[b].sum() <= 12 for b in budget)
    with pytest.raises(ValueError, match="below the longest cell"):
        packed_batches(lengths, max_tokens=8)


@pytest.mark.parametrize("vocab_name", ["gc30M", "gc104M"])
def test_packed_mlm_loss_and_gradients_equal_the_padded_computation(pbmc3k_v1_corpus, vocab_name):
    """fp32, dropout off: the loss within 1e-5 and every parameter's gradient close, on real cells (V1
    corpus; the gc104M case re-reads them as V2 ids with <cls>/<eos> around them)."""
    vocab = load_vocab(vocab_name)
    cells = _real_cells(pbmc3k_v1_corpus, 7)
    if vocab.cls_id is not None:  # V2 layout: <cls> genes <eos>, gene ids valid in the smaller vocabulary
        cells = [np.concatenate([[vocab.cls_id], np.minimum(c[:300], vocab.num_tokens - 1), [vocab.eos_id]]) for c in cells]
    model = build_model("tiny", vocab_name, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    use_geneformer_attention(model)
    objective = MaskedGeneObjective(model)
    ids, mask = pad_cells(cells, pad_id=vocab.pad_id)
    masked, labels = GeneMasker.for_vocab(vocab, seed=1)(ids)
    padded_loss = objective(torch.tensor(masked), torch.tensor(mask), torch.tensor(labels))
    padded_loss.backward()
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    row = pack_cells([m[: len(c)] for m, c in zip(masked, cells)], pad_id=vocab.pad_id, multiple=64)
    row_labels = pack_cells([lab[: len(c)] for lab, c in zip(labels, cells)], pad_id=IGNORE_INDEX, multiple=64)["input_ids"]
    packed_loss = objective(torch.tensor(row["input_ids"]), None, torch.tensor(row_labels),
                            torch.tensor(row["position_ids"]), row["cu_seqlens"])
    packed_loss.backward()
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    for name, grad in padded_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("kernel", ["looped", "padded"])
def test_attention_stays_within_each_cell(kernel):
    """Both fallbacks: each cell's output is that cell's attention alone; changing one cell's keys and values
    leaves every other cell's output unchanged, with attention dropout in training too."""

    def attend(q, k, v, **kw):
        if kernel == "looped":
            return looped_varlen(q, k, v, offsets.numpy(), scaling=8 ** -0.5, **kw)
        return padded_varlen(q, k, v, offsets, 11, scaling=8 ** -0.5, **kw)

    torch.manual_seed(0)
    q, k, v = (torch.randn(23, 2, 8) for _ in range(3))
    offsets = torch.tensor([0, 5, 6, 17, 23], dtype=torch.int32)
    out = attend(q, k, v, dropout=0.0)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):  # each cell alone through SDPA
        alone = torch.nn.functional.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))
        assert torch.allclose(out[a:b], alone[0].transpose(0, 1), atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[6:17], v2[6:17] = torch.randn(11, 2, 8), torch.randn(11, 2, 8)  # the third cell only
    outside = torch.ones(23, dtype=torch.bool)
    outside[6:17] = False
    torch.manual_seed(3)  # the dropped weights depend on the draws alone, not on the values
    dropped = attend(q, k, v, dropout=0.3, sparse=True)
    torch.manual_seed(3)
    dropped2 = attend(q, k2, v2, dropout=0.3, sparse=True)
    assert torch.equal(dropped[outside], dropped2[outside]) and not torch.equal(dropped, out)


def test_packed_embeddings_equal_padded_ones(pbmc3k_v1_corpus, tmp_path):
    """The cell embeddings of a model folder, packed vs padded: cosine >= 0.9999 for every cell (both poolings)."""
    model = build_model("gf-6L-10M-i2048", seed=0)
    save_model(model, tmp_path / "model", vocab="gc30M")
    cells = _real_cells(pbmc3k_v1_corpus, 16, seed=1)
    padded = CellEncoder(tmp_path / "model", layer=-1)
    packed = CellEncoder(tmp_path / "model", layer=-1, packing=True)
    for mode in ("mean", "cls"):
        a, b = padded.cell_embeddings(cells, mode), packed.cell_embeddings(cells, mode)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape == (16, 256) and cos.min() >= 0.9999, (mode, cos.min())


def test_segment_mean_and_refusals():
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    weights = torch.tensor([True, True, False, True, True, False])
    assert segment_mean(hidden, [0, 3, 6], weights).tolist() == [[1.0, 2.0], [7.0, 8.0]]
    model = build_model("tiny", seed=0)  # stock SDPA: the offsets would be ignored, so refuse
    with pytest.raises(ValueError, match="use_geneformer_attention"):
        packed_hidden(model.bert, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], [0, 4])
    use_geneformer_attention(model)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        packed_hidden(model.bert, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], [0, 3])


def test_kernel_and_default_follow_the_device():
    assert varlen_kernel("cuda", torch.bfloat16) == "flash" and varlen_kernel("cuda", torch.float16) == "flash"
    assert varlen_kernel("cuda", torch.float32) == "padded"  # flash kernels have no fp32 form
    assert varlen_kernel("npu", torch.bfloat16) == "npu_tnd" and varlen_kernel("npu", torch.float32) == "padded"
    assert varlen_kernel("cpu", torch.bfloat16) == "looped" == varlen_kernel("cpu", torch.float32)
    assert packing_enabled("auto") and packing_enabled("on") and not packing_enabled("off")
    with pytest.raises(ValueError, match="use auto, on, off"):
        packing_enabled("yes")


def test_pretraining_on_packed_rows_trains_every_cell_once(ray_session, pbmc3k_subset_corpus, tmp_path):
    """Two workers, token budgets, gradient accumulation, packed rows: one whole epoch, every training cell
    in the cell log exactly once, almost no padding (the tails up to a multiple of 64), the loss falls."""
    from geneformer_ray.settings import load_config
    from geneformer_ray.train.config import PretrainConfig
    from geneformer_ray.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, "geneformer_ray/resources/configs/pretrain_tiny.yaml", [
        f"data.corpus={pbmc3k_subset_corpus}", "data.batch_size=null", "data.max_tokens=8000", "data.packing=on",
        "data.pad_to_multiple=64", "model.output_bias=zero", "optim.grad_accum_steps=2", "train.epochs=1", "train.max_steps=null",
        "train.num_workers=2", "accelerator.type=cpu", "accelerator.cpus_per_worker=1", "train.run_name=packed",
        f"train.storage_path={tmp_path}", "tracking.uri=none", "train.log_every=5", f"train.cell_log={tmp_path / 'cells'}"])
    summary = pretrain(cfg)
    m = summary["metrics"]
    assert m["epoch"] == 1 and m["weights_identical_across_ranks"] and m["final_loss"] < m["first_loss"]
    logged = [c for f in sorted((tmp_path / "cells").glob("*.jsonl")) for line in f.read_text().splitlines()
              for c in json.loads(line)["cells"]]
    assert len(logged) == len(set(logged)) == m["training_cells"]
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines()]
    assert all(w["padding_fraction"] < 0.02 for w in windows if "padding_fraction" in w)


def test_activation_checkpointing_and_fused_adamw_change_nothing_but_speed_and_memory(pbmc3k_v1_corpus):
    """On a packed row: checkpointed layers give the same loss and gradients; torch's fused AdamW (CPU here, as
    on CUDA) takes the same step as the default; the optimizer follows the device."""
    from types import SimpleNamespace

    from geneformer_ray.models.flavours import checkpoint_activations
    from geneformer_ray.train.common import build_optimizer, optimizer_kind

    vocab = load_vocab("gc30M")
    row = pack_cells(_real_cells(pbmc3k_v1_corpus, 5), multiple=64)
    masked, labels = GeneMasker.for_vocab(vocab, seed=2)(row["input_ids"])
    results = []
    for checkpointed, fused in ((False, "off"), (True, "on")):
        model = build_model("tiny", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        use_geneformer_attention(model)
        if checkpointed:
            checkpoint_activations(model)
        optim = SimpleNamespace(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=fused)
        optimizer = build_optimizer(model, optim, "cpu")
        assert bool(optimizer.defaults["fused"]) == (fused == "on")
        loss = MaskedGeneObjective(model.train())(torch.tensor(masked), None, torch.tensor(labels),
                                                  torch.tensor(row["position_ids"]), row["cu_seqlens"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        results.append((loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)
    assert all(torch.allclose(after_a[n], after_b[n], atol=1e-6) for n in after_a)
    assert [optimizer_kind(k) for k in ("cpu", "cuda", "npu")] == ["fused", "fused", "npu_fused"]
    assert optimizer_kind("cuda", "off") == "foreach" and optimizer_kind("cpu", "off") == "foreach"


def test_packing_settings_read_yaml_words_and_refuse_others(pbmc3k_v1_corpus, tmp_path):
    from geneformer_ray.infer.config import EmbedConfig
    from geneformer_ray.settings import load_config
    from geneformer_ray.train.config import PretrainConfig

    (tmp_path / "c.yaml").write_text(f"data:\n  corpus: {pbmc3k_v1_corpus}\n  packing: off\noptim:\n  fused: on\n")
    cfg = load_config(PretrainConfig, tmp_path / "c.yaml", [])  # YAML reads on/off as booleans
    assert cfg.data.packing == "off" and cfg.optim.fused == "on"
    with pytest.raises(ValueError, match="data.packing='x': use auto, on, off"):
        load_config(PretrainConfig, tmp_path / "c.yaml", ["data.packing=x"])
    with pytest.raises(ValueError, match="optim.fused='x'"):
        load_config(PretrainConfig, tmp_path / "c.yaml", ["optim.fused=x"])
    assert EmbedConfig(model=tmp_path, corpus=tmp_path, out=tmp_path, packing=False).packing == "off"
    with pytest.raises(ValueError, match="--packing 'maybe': use auto, on, off"):
        EmbedConfig(model=tmp_path, corpus=tmp_path, out=tmp_path, packing="maybe")
