"""Ring 2: the Python API driven as a notebook would drive it: an in-memory AnnData in, model folders in
the layouts Geneformer publishes (random weights), result objects and AnnData slots out."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from pandas.testing import assert_frame_equal
import pytest
import torch
import transformers
from safetensors.torch import save_model as save_safetensors

import geneformer_ray as gr
from geneformer_ray.infer.config import PredictConfig
from geneformer_ray.infer.encoder import CellEncoder
from geneformer_ray.models.tasks import build_task_model, check_head
from geneformer_ray.train.baseline import log_normalised_counts

from conftest import PBMC_SMALL, TEST_DATA

PUBLISHED = TEST_DATA / "published_configs"  # config.json of Geneformer's model folders, as published


def published_folder(name: str, folder: Path, *, weights: str, shrink: dict | None = None) -> Path:
    """A model folder with the published config.json (written as published: transformers version and all)
    and random weights under the published file name; ``shrink`` makes a large model small (same layout)."""
    config = {**json.loads((PUBLISHED / name / "config.json").read_text()), **(shrink or {})}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = getattr(transformers, config["architectures"][0])(transformers.BertConfig(**config))
    if weights == "pytorch_model.bin":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        save_safetensors(model, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {
        "V1": published_folder("Geneformer-V1-10M", root / "V1-10M", weights="pytorch_model.bin"),  # 6 x 256, as published
        "V2": published_folder("Geneformer-V2-104M", root / "V2-104M", weights="model.safetensors",
                               shrink={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                       "intermediate_size": 128}),
        "classifier": published_folder("Geneformer-V1-10M_CellClassifier_cardiomyopathies_220224", root / "classifier",
                                       weights="pytorch_model.bin"),  # transformers 4.6.0, 3 labels
    }


def test_a_notebook_session_on_published_model_folders(ray_session, published, tmp_path):
    adata = anndata.read_h5ad(PBMC_SMALL)  # 80 real cells, raw counts, in memory

    corpus = gr.tokenize(adata, tmp_path / "corpus", obs=["letter.idents", "RNA_snn_res.1"], progress=False)
    assert (corpus.num_cells, corpus.vocab) == (80, "gc30M") and "80 of 80 cells" in corpus.describe()
    assert set(corpus.cells()["letter.idents"]) == {"A", "B"}
    assert (corpus.path / "sources" / "anndata-0.h5ad").exists()  # the AnnData is kept with its corpus
    assert corpus.manifest["sources"][0]["path"] == str(corpus.path / "sources" / "anndata-0.h5ad")

    # embeddings of the published V1-10M encoder (pytorch_model.bin only) land in the AnnData
    emb = gr.embed(published["V1"], corpus, tmp_path / "embed", adata=adata, color=["letter.idents"], num_actors=1,
                   accelerator="cpu")
    vectors = adata.obsm["X_geneformer"]
    assert vectors.shape == (80, 256) and np.isfinite(vectors).all() and adata.uns["geneformer"]["params"]["layer"] == -1
    first = np.asarray(corpus.cells(["cell_id", "input_ids"]).set_index("cell_id").loc[adata.obs_names[0], "input_ids"])
    by_hand = CellEncoder(published["V1"], layer=-1).cell_embeddings([first])[0]  # the same cell alone, in this process
    np.testing.assert_allclose(vectors[0], by_hand, atol=1e-5)
    back = emb.to_anndata()
    assert back.n_obs == 80 and set(back.obs["letter.idents"]) == {"A", "B"} and back.obsm["X_geneformer"].shape == (80, 256)
    assert emb.plots and all(p.exists() for p in emb.plots)

    # the transformers-4.6 cell classifier predicts every cell into obs columns (a config object does what
    # the plain values do)
    predictions = gr.predict(PredictConfig(model=published["classifier"], corpus=corpus.path, out=tmp_path / "predict",
                                           num_actors=1, accelerator={"type": "cpu"}), adata=adata)
    assert predictions.kind == "cell" and len(predictions.table()) == 80
    assert set(adata.obs["geneformer_predicted"]) <= {"LABEL_0", "LABEL_1", "LABEL_2"}
    probabilities = adata.obs[[f"geneformer_prob_LABEL_{i}" for i in range(3)]].to_numpy(float)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)

    # the baseline of a fine-tuning run reads its counts from the AnnData the corpus kept (fine-tuning through
    # this API runs in test_finetune.py)
    counts = log_normalised_counts(corpus.manifest, list(adata.obs_names[::-1]))
    assert counts.shape == (80, 230) and counts[0].toarray().sum() > 0
    # a task model starts from the published encoder (pytorch_model.bin, no vocabulary record): weights loaded
    check_head("cell", {"letter.idents": ["A", "B"]}, published["V1"])
    task_model = build_task_model("cell", {"letter.idents": ["A", "B"]}, init_from=str(published["V1"]))
    published_weights = torch.load(published["V1"] / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(task_model.bert.encoder.layer[5].output.dense.weight,
                               published_weights["bert.encoder.layer.5.output.dense.weight"])

    # the V2-104M layout (<cls> ... <eos>): perturbation statistics come back as a DataFrame
    v2_corpus = gr.tokenize(adata, tmp_path / "corpus_v2", vocab="gc104M", obs=[], progress=False)
    perturbation = gr.perturb(published["V2"], v2_corpus, tmp_path / "perturb", perturbation="delete", emb_mode="cls",
                              genes=["CD79A", "MS4A1"], null_genes=2, num_actors=1, accelerator="cpu", progress=False)
    stats = perturbation.gene_stats
    assert isinstance(stats, pd.DataFrame) and set(stats["symbol"]) == {"CD79A", "MS4A1"}
    assert (stats["cells"] > 0).all() and len(perturbation.shifts()) > len(stats)
    raw = perturbation.stats("aggregate_data", genes=["CD79A"])
    assert set(raw["symbol"]) == {"CD79A"} and len(raw) == stats.loc[stats["symbol"] == "CD79A", "cells"].item()
    assert_frame_equal(gr.perturb_stats(tmp_path / "perturb", "vs_random"), stats, check_dtype=False)


def test_bad_values_are_refused_naming_the_field_before_ray_starts(tmp_path):
    with pytest.raises(ValueError, match="--mode 'umap': use mean, cls, gene"):
        gr.embed(tmp_path, tmp_path, tmp_path / "out", mode="umap")
    with pytest.raises(ValueError, match="unknown config key train.num_worker: did you mean train.num_workers"):
        gr.pretrain({"data": {"corpus": tmp_path}, "train": {"num_worker": 2}})
    with pytest.raises(ValueError, match=r"train.epochs: input should be a valid integer.*\(got 'two'\)"):
        gr.finetune({"data": {"corpus": tmp_path}, "task": {"label_column": "x"}}, overrides=["train.epochs=two"])
    with pytest.raises(ValueError, match="pass either --genes ID ... or --all-genes"):
        gr.perturb(tmp_path, tmp_path, tmp_path / "out", perturbation="delete")
