"""Ring 1: sparse attention dropout has dropout's law, an exact oracle, and leaves saved models stock."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertForMaskedLM

from geneformer_ray.models.attention import attention_forward, dropped_positions, sparse_dropout, use_geneformer_attention
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model


def test_sparse_dropout_has_the_law_of_dropout():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    y = sparse_dropout(torch.ones(n), p)
    zero = y == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(zero.float().mean().item() - p) < 5 * sigma
    assert torch.allclose(y[~zero], torch.full_like(y[~zero], 1 / (1 - p)))  # survivors scaled: the expectation is kept
    blocks = zero.view(20, -1).float().mean(1)  # uniform along the tensor, up to its last element
    assert torch.all((blocks - p).abs() < 5 * math.sqrt(p * (1 - p) / (n / 20)))
    pairs = (zero[:-1] & zero[1:]).float().mean().item()  # neighbours independent: P(both) = p^2
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p / n)
    assert zero[-1000:].any() and zero[:1000].any()


def test_dropped_positions_are_sorted_unique_in_range_and_seeded():
    torch.manual_seed(3)
    a = dropped_positions(10_000, 0.3, "cpu")
    torch.manual_seed(3)
    b = dropped_positions(10_000, 0.3, "cpu")
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 10_000 and torch.all(a[1:] > a[:-1])
    many = dropped_positions(50, 0.9, "cpu")  # the draw loop must reach the end whatever the luck
    assert many.numel() > 30 and many.max() < 50


def test_sparse_dropout_gradient_is_masked_and_scaled():
    torch.manual_seed(1)
    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64)
    y = sparse_dropout(x, 0.25)
    (y * w).sum().backward()
    kept = (y != 0).float()
    assert torch.allclose(x.grad, kept * w / 0.75)
    assert torch.equal(sparse_dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="outside"):
        sparse_dropout(x, 1.0)


def test_attention_forward_equals_a_hand_computation_with_the_same_dropped_positions():
    torch.manual_seed(0)
    batch, heads, seq, dim, p = 3, 2, 7, 4, 0.3
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    lengths = torch.tensor([7, 5, 2])
    keys_real = torch.arange(seq)[None, :] < lengths[:, None]  # (batch, seq)
    mask = keys_real[:, None, None, :].expand(batch, 1, seq, seq)  # True = attend, as transformers' sdpa_mask
    module = torch.nn.Module().train()
    module.sparse_dropout = True  # as use_geneformer_attention marks BERT's self-attention modules
    torch.manual_seed(42)
    out, _ = attention_forward(module, q, k, v, mask, dropout=p, scaling=dim**-0.5)
    torch.manual_seed(42)
    dropped = dropped_positions(batch * heads * seq * seq, p, "cpu")
    scores = (q @ k.transpose(2, 3)) / math.sqrt(dim)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) / (1 - p)
    probs.view(-1)[dropped] = 0.0
    assert torch.allclose(out, (probs @ v).transpose(1, 2), atol=1e-6)
    out0, _ = attention_forward(module, q, k, v, mask, dropout=0.0, scaling=dim**-0.5)  # stock SDPA path
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.allclose(out0, exact, atol=1e-6)


def test_model_switch_keeps_evaluation_identical_and_saved_models_stock(tmp_path):
    model = build_model("tiny", seed=0, attention_probs_dropout_prob=0.1).eval()
    ids = torch.tensor([[2, 500, 600, 0, 0], [2, 700, 800, 900, 1000]])
    attention_mask = (ids != 0).long()
    before = model(input_ids=ids, attention_mask=attention_mask).logits
    use_geneformer_attention(model)
    after = model(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.allclose(before, after, atol=1e-5)
    model.train()
    torch.manual_seed(0)
    loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    save_model(model, tmp_path / "m", vocab="gc30M")
    assert "sparse_dropout" not in (tmp_path / "m" / "config.json").read_text()
    assert "geneformer\"" not in (tmp_path / "m" / "config.json").read_text()  # no attention implementation saved
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=attention_mask).logits, before, atol=1e-5)
