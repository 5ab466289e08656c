"""Embedding and perturbation pieces without Ray: layer choice, perturbed encodings, the encoder's
pooling against a hand computation, the statistics on a constructed case, the plots, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from geneformer_ray.infer.encoder import CellEncoder, hidden_state_index, select_cells
from geneformer_ray.infer.plots import heatmap_rows, plot_heatmap, plot_umap
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.infer.config import parse_state
from geneformer_ray.infer.perturb import PerturbParams, _open_output
from geneformer_ray.infer.perturb_plan import resolve_genes
from geneformer_ray.infer.perturb_stats import benjamini_hochberg
from geneformer_ray.data.vocab import load_vocab


def test_layer_choice_counts_like_geneformer():
    assert hidden_state_index(0, 6) == 6  # the last layer
    assert hidden_state_index(-1, 6) == 5  # the second to last: Geneformer's default
    assert hidden_state_index(-6, 6) == 0  # the input embeddings
    for bad in (1, -7):
        with pytest.raises(ValueError, match=r"--layer .* out of range for a 6-layer model"):
            hidden_state_index(bad, 6)


def test_encoder_mean_and_cls_equal_a_hand_computation_without_special_or_pad_tokens(tmp_path):
    """V2: the mean excludes <cls>, <eos> and padding; padding a batch changes nothing."""
    model = build_model("tiny", "gc104M", seed=1).eval()
    folder = save_model(model, tmp_path / "v2", vocab="gc104M")
    cells = [np.array([2, 40, 41, 42, 43, 44, 3]), np.array([2, 50, 51, 3])]
    for layer in (0, -1, -2):
        encoder = CellEncoder(folder, layer=layer)
        batch_mean = encoder.cell_embeddings(cells, "mean")  # the short cell is padded
        batch_cls = encoder.cell_embeddings(cells, "cls")
        for i, cell in enumerate(cells):
            with torch.no_grad():  # hand computation: one cell, no padding, the full model's hidden states
                states = model.bert(input_ids=torch.tensor(cell)[None], output_hidden_states=True).hidden_states
            chosen = states[len(states) - 1 + layer][0]  # hidden_states[num_layers + layer]
            np.testing.assert_allclose(batch_mean[i], chosen[1:-1].mean(0).numpy(), atol=2e-6)
            np.testing.assert_allclose(batch_cls[i], chosen[0].numpy(), atol=2e-6)


def test_benjamini_hochberg_by_hand():
    # sorted p: 0.01 0.02 0.03 0.5 (m = 4): p * m / rank = 0.04 0.04 0.04 0.5, then the running minimum from the top
    np.testing.assert_allclose(benjamini_hochberg([0.03, np.nan, 0.01, 0.5, 0.02]), [0.04, np.nan, 0.04, 0.5, 0.04])


def test_genes_by_symbol_or_id_and_states():
    vocab = load_vocab("gc30M")
    assert resolve_genes(["CD74", "ENSG00000090382", "cd74"], vocab) == ["ENSG00000019582", "ENSG00000090382"]
    with pytest.raises(ValueError, match=r"--genes: 'CD7A' is unknown \(nearest: .*CD79A.*\); 'MALAT1' \(ENSG\d+\) has no token in the gc30M vocabulary.*human"):
        resolve_genes(["CD74", "CD7A", "MALAT1"], vocab)
    assert vocab.gene_symbols["ENSG00000019582"] == "CD74"
    assert parse_state("cell_type=CD14+ Mono", "--goal-state") == ["cell_type", "CD14+ Mono"]
    with pytest.raises(ValueError, match="use COLUMN=VALUE"):
        parse_state("B", "--start-state")


def test_a_perturbation_folder_resumes_only_the_same_run(tmp_path):
    params = PerturbParams(model="m", corpus="c", perturbation="delete", genes=["ENSG00000019582"])
    assert _open_output(tmp_path / "run", params, overwrite=False) == {}
    (tmp_path / "run" / "perturb.json").write_text('{"params": %s}' % __import__("json").dumps(params.__dict__))
    assert _open_output(tmp_path / "run", params, overwrite=False)["params"]["perturbation"] == "delete"
    other = PerturbParams(model="m", corpus="c", perturbation="overexpress", genes=["ENSG00000019582"])
    with pytest.raises(ValueError, match=r"other parameters \(perturbation\)"):
        _open_output(tmp_path / "run", other, overwrite=False)
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no perturbation run"):
        _open_output(tmp_path / "notarun", params, overwrite=False)
    assert (tmp_path / "notarun" / "x.txt").read_text() == "keep me"


def test_cell_selection_by_state_and_sample(pbmc3k_v1_corpus):
    b_cells = select_cells(pbmc3k_v1_corpus, where=("cell_type", "B"))
    assert len(b_cells) == 344
    sample = select_cells(pbmc3k_v1_corpus, where=("cell_type", "B"), max_cells=20, seed=3)
    assert len(sample) == 20 and set(sample) <= set(b_cells)
    assert sample == [c for c in b_cells if c in set(sample)]  # corpus order kept
    assert sample == select_cells(pbmc3k_v1_corpus, where=("cell_type", "B"), max_cells=20, seed=3)


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    labels = pd.Series(np.repeat(["a", "b", "c"], [60, 30, 10]), name="cell_type")
    embeddings = rng.normal(size=(100, 16)).astype(np.float32) + (labels == "a").to_numpy()[:, None]
    umap_png = plot_umap(embeddings, labels, tmp_path / "umap.png", title="t")
    heat_png = plot_heatmap(embeddings, labels, tmp_path / "heat.png", title="t")
    numeric = plot_umap(embeddings, pd.Series(rng.normal(size=100), name="n_counts"), tmp_path / "numeric.png", title="t")
    assert all(p.stat().st_size > 10_000 for p in (umap_png, heat_png, numeric))
    rows = heatmap_rows(labels, max_cells=50)
    assert len(rows) == 50 and list(labels[rows][:30]) == ["a"] * 30  # largest group first, in proportion
