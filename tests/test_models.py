"""Ring 1: model flavours, Hugging Face save/load, vocabulary checks, the masked-only MLM head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from geneformer_ray.models.flavours import FLAVOURS, MaskedGeneObjective, bert_config, build_model, count_parameters
from geneformer_ray.models.folders import check_corpus_vocab, load_model, save_model


@pytest.mark.parametrize("flavour, millions", [
    ("gf-6L-10M-i2048", 10), ("gf-12L-40M-i2048", 40), ("gf-12L-38M-i4096", 38),
    ("gf-20L-151M-i4096", 151), ("gf-12L-104M-i4096", 104), ("gf-18L-316M-i4096", 316),
])
def test_published_flavours_have_their_parameter_counts(flavour, millions):
    from transformers import BertForMaskedLM

    with torch.device("meta"):  # no memory, no init time: only shapes
        model = BertForMaskedLM(bert_config(flavour))
    assert round(count_parameters(model) / 1e6) == millions
    config = model.config
    assert (config.hidden_act, config.layer_norm_eps, config.pad_token_id) == ("relu", 1e-12, 0)
    assert config.max_position_embeddings == (2048 if flavour.endswith("i2048") else 4096)
    assert config.vocab_size == (25_426 if flavour.endswith("i2048") else 20_275)
    assert config.hidden_dropout_prob == (0.1 if millions in (104, 316) else 0.02)


def test_unknown_flavour_lists_the_known_ones():
    with pytest.raises(ValueError, match="gf-6L-10M-i2048"):
        bert_config("gf-99L")
    assert "tiny" in FLAVOURS


def test_saved_model_loads_in_plain_transformers(tmp_path):
    from transformers import BertForMaskedLM

    model = build_model("tiny", seed=0).eval()
    save_model(model, tmp_path / "m", vocab="gc30M")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["geneformer_vocab_name"] == "gc30M"
    plain = BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[5, 9, 100, 7]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    ours, vocab = load_model(tmp_path / "m")
    assert vocab.name == "gc30M"


def test_published_checkpoint_without_vocab_record_is_recognised_by_size(tmp_path):
    model = build_model("tiny", vocab="gc104M", seed=0)
    for key in ("geneformer_vocab_name", "geneformer_vocab_sha256"):
        delattr(model.config, key)
    folder = tmp_path / "published"  # the layout of the older published checkpoints: config + pytorch_model.bin
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded, vocab = load_model(folder)
    assert vocab.name == "gc104M"
    torch.testing.assert_close(loaded.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_vocabulary_mismatch_is_refused(tmp_path):
    from geneformer_ray.data.corpus import read_manifest
    from geneformer_ray.data.tokenize import tokenize
    from conftest import PBMC_SMALL

    tokenize([PBMC_SMALL], tmp_path / "v2", vocab="gc104M", executor="local", progress=False)
    model = build_model("tiny", vocab="gc30M")
    with pytest.raises(ValueError, match="tokenized with vocabulary gc104M .* the model uses gc30M"):
        check_corpus_vocab(model, read_manifest(tmp_path / "v2"), corpus=tmp_path / "v2")
    with pytest.raises(ValueError, match="not gc104M"):
        save_model(model, tmp_path / "x", vocab="gc104M")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_masked_only_head_equals_the_full_head_loss():
    model = build_model("tiny", seed=0).eval()
    torch.manual_seed(0)
    ids = torch.randint(2, 25_426, (3, 20))
    attention = torch.ones_like(ids)
    attention[2, 15:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7], labels[2, 1] = 11, 12, 13
    ours = MaskedGeneObjective(model)(ids, attention, labels)
    full = F.cross_entropy(model(input_ids=ids, attention_mask=attention).logits.view(-1, 25_426), labels.view(-1))
    torch.testing.assert_close(ours, full)


@pytest.mark.parametrize("flavour", ["tiny", "gf-6L-10M"])
def test_fused_head_loss_gives_the_plain_loss_and_every_gradient(flavour):
    """The CPU path (decoder + cross-entropy fused over chunks of masked rows, gradients formed in the
    forward pass) against cross_entropy(cls(h)): loss, every parameter's gradient (the decoder weight is
    tied to the gene embeddings, so both routes add into it), and the no-grad loss; ~400 masked rows
    span several chunks."""
    from geneformer_ray.models.head_loss import chunk_rows, linear_cross_entropy

    model = build_model(flavour, seed=0).train()
    torch.manual_seed(1)
    ids = torch.randint(4, 25_426, (8, 300))
    attention = torch.ones_like(ids)
    attention[3, 250:] = 0
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape) < 0.17
    picked &= attention.bool()
    labels[picked] = torch.randint(4, 25_426, (int(picked.sum()),))
    assert int(picked.sum()) > 2 * chunk_rows(model.config.hidden_size)

    def loss_and_grads(fused: bool):
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks
        if fused:
            loss = MaskedGeneObjective(model)(ids, attention, labels)
        else:
            hidden = model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
            loss = F.cross_entropy(model.cls(hidden[picked]).float(), labels[picked])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused_loss, fused_grads = loss_and_grads(True)
    plain_loss, plain_grads = loss_and_grads(False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        head = model.cls.predictions
        states = head.transform(torch.randn(70, model.config.hidden_size))
        targets = torch.randint(0, 25_426, (70,))
        torch.testing.assert_close(linear_cross_entropy(states, head.decoder.weight, head.decoder.bias, targets),
                                   F.cross_entropy(head.decoder(states), targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavour, published", [("gf-6L-10M", "Geneformer-V1-10M"), ("gf-12L-104M", "Geneformer-V2-104M"),
                                                ("gf-18L-316M", "Geneformer-V2-316M")])
def test_short_flavour_names_build_the_published_configs(flavour, published):
    """Every architecture setting of the authors' config.json (../shared/geneformer/published_configs)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "geneformer" / "published_configs" / published
    theirs = json.loads((folder / "config.json").read_text())
    ours = bert_config(flavour).to_dict()
    for key, value in theirs.items():
        if key not in ("architectures", "transformers_version", "torch_dtype", "use_cache", "classifier_dropout",
                       "gradient_checkpointing"):  # run-time switches, not the architecture
            assert ours[key] == value, (flavour, key)
