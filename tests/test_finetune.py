"""Rings 2-3 of fine-tuning: each task end to end with 2 gloo workers on real PBMC3k cells."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

import geneformer_ray as gr
from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.settings import load_config
from geneformer_ray.train.finetune import finetune, format_finetune_summary

from conftest import SUBSET_CELLS, TEST_DATA, read_corpus_table

LINEAGE = ('task.derived_columns={lineage: {source: cell_type, "Naive CD4 T": T/NK, "Memory CD4 T": T/NK, "CD8 T": T/NK, '
           'NK: T/NK, B: B, "CD14+ Mono": myeloid, "FCGR3A+ Mono": myeloid, DC: myeloid}}')


@pytest.fixture(scope="module")
def corpus(pbmc3k_v1_corpus):
    return pbmc3k_v1_corpus


def _cfg(corpus, storage, *extra):
    return load_config(FinetuneConfig, None, [
        f"data.corpus={corpus}", f"train.storage_path={storage}", "accelerator.type=cpu", "train.max_failures=0",
        "optim.lr=0.003", "optim.warmup_steps=5", "data.batch_size=16", "train.epochs=1", "task.min_class_size=10", *extra])


def test_cell_classification_end_to_end_tracked_on_a_server(ray_session, corpus, pbmc3k_subset_corpus, tmp_path, mlflow_server):
    from transformers import BertForSequenceClassification

    fit = gr.finetune(_cfg(corpus, tmp_path, "task.label_column=lineage", LINEAGE, "task.class_weights=balanced",
                           "task.baseline=true", "train.eval_every=25", f"tracking.uri={mlflow_server}",
                           "tracking.register_as=gf-tiny-lineage"))  # the Python API, with a config object
    summary, m = fit.summary, fit.metrics
    assert fit.model == Path(summary["model"]) and len(fit.test_predictions()) == summary["split_sizes"]["test"]
    assert {"loss", "val_macro_f1"} <= set(fit.history().columns) and fit.describe() == format_finetune_summary(summary)
    assert m["test_roc_auc"] > 0.6 and np.isfinite(m["test_macro_f1"])  # better than chance (0.5) on an easy task
    assert summary["baseline"]["lineage"]["macro_f1"] > 0.8 and summary["baseline"]["lineage"]["same_genes_macro_f1"] > 0.8
    predictions = pq.read_table(Path(summary["evaluation"]) / "test_predictions.parquet").to_pandas()
    assert len(predictions) == summary["split_sizes"]["test"] and predictions["cell_id"].is_unique
    assert set(predictions.columns) >= {"cell_id", "true", "predicted", "prob_B", "prob_T/NK", "prob_myeloid"}
    assert np.allclose(predictions.filter(like="prob_").sum(axis=1), 1, atol=1e-4)
    assert (Path(summary["evaluation"]) / "test_confusion_matrix.png").stat().st_size > 10_000
    model = BertForSequenceClassification.from_pretrained(summary["model"])
    assert model.config.id2label == {0: "B", 1: "T/NK", 2: "myeloid", 3: "other"}
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["test_macro_f1"] == pytest.approx(m["test_macro_f1"])
    assert {h.step for h in client.get_metric_history(run.info.run_id, "val_macro_f1")} >= {25}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/test_confusion_matrix.png" in artifacts and "evaluation/test_predictions.parquet" in artifacts
    assert client.search_model_versions("name='gf-tiny-lineage'")[0].run_id == run.info.run_id
    assert "baseline (lineage)" in format_finetune_summary(summary) and "genes the model reads" in format_finetune_summary(summary)

    from geneformer_ray.cli import main

    # batch prediction of another corpus of the same cells (600 of them, in 2 shards)
    assert main(["predict", "--model", summary["model"], "--corpus", str(pbmc3k_subset_corpus), "--out", str(tmp_path / "preds"),
                 "--actors", "2", "--accelerator", "cpu"]) == 0  # Ray Data over a pool of 2 model actors
    predicted = pq.read_table(tmp_path / "preds" / "predictions").to_pandas().set_index("cell_id")
    corpus_ids = read_corpus_table(pbmc3k_subset_corpus).column("cell_id").to_pylist()
    assert len(predicted) == SUBSET_CELLS and predicted.index.is_unique and set(corpus_ids) == set(predicted.index)
    evaluated = predictions.set_index("cell_id")
    both = evaluated.index.intersection(predicted.index)
    assert len(both) > 50  # test-split cells that are also in the subset
    same = predicted.loc[both]
    assert (same["predicted"] == evaluated.loc[both, "predicted"]).all()  # the evaluation's own predictions
    assert np.allclose(same["prob_B"], evaluated.loc[both, "prob_B"], atol=1e-4)


def test_gene_classification_cross_validates_by_gene(ray_session, pbmc3k_subset_corpus, tmp_path):
    corpus = pbmc3k_subset_corpus  # 600 cells
    summary = finetune(_cfg(corpus, tmp_path, "task.kind=gene", f"task.gene_classes={TEST_DATA / 'gene_lists' / 'dosage_sens_tf_labels.csv'}",
                            "task.num_folds=3", "task.max_folds=2", "train.max_steps=20", "train.run_name=dosage",
                            "data.loader=stream"))  # Ray Data streams the splits (the default holds small ones in memory)
    assert len(summary["folds"]) == 2 and all(np.isfinite(summary["test_roc_auc_per_fold"]))
    assert summary["genes"]["used"] > 100 and summary["genes"]["not_in_vocab"] == 0
    tested = []
    for fold in summary["folds"]:
        predictions = pq.read_table(Path(fold["evaluation"]) / "test_predictions.parquet").to_pandas()
        tested.append(set(predictions["gene_token"]))
    assert not tested[0] & tested[1]  # a gene is tested in one fold only
    saved = json.loads(Path(summary["summary_file"]).read_text())
    assert saved["test_roc_auc_per_fold"] == summary["test_roc_auc_per_fold"]
    runs = mlflow.MlflowClient(summary["tracking_uri"]).search_runs(
        [mlflow.MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert len(runs) == 2  # one child run per fold under the study's run

    from geneformer_ray.api import predict

    out = predict(summary["folds"][0]["model"], corpus, tmp_path / "gene_preds", num_actors=1).summary
    genes = pq.read_table(Path(out["out"]) / "gene_predictions.parquet").to_pandas()
    assert out["kind"] == "gene" and len(genes) == out["rows"] > 10_000 and genes["gene"].is_unique
    assert genes["gene"].str.startswith("ENSG").all() and (genes["cells"] >= 1).all()
    assert np.allclose(genes[["prob_dosage_insensitive", "prob_dosage_sensitive"]].sum(axis=1), 1, atol=1e-4)


def test_multitask_from_a_pretrained_encoder_with_frozen_layers_then_resumed(ray_session, corpus, tmp_path):
    from geneformer_ray.models.flavours import build_model
    from geneformer_ray.models.folders import save_model

    pretrained = save_model(build_model("tiny", seed=3), tmp_path / "pretrained", vocab="gc30M")
    args = [corpus, tmp_path, "task.kind=multitask", "task.label_columns=[cell_type, lineage]", LINEAGE,
            "task.loss_weights={lineage: 0.5}", f"model.init_from={pretrained}", "model.freeze_layers=1",
            "train.run_name=multi", "task.min_class_size=20"]
    summary = finetune(_cfg(*args, "train.max_steps=30"))
    m = summary["metrics"]
    for task in ("cell_type", "lineage"):
        assert np.isfinite(m[f"test_{task}_macro_f1"]) and np.isfinite(m[f"test_{task}_accuracy"])
        assert (Path(summary["evaluation"]) / f"test_{task}_confusion_matrix.csv").exists()
    assert summary["dropped_classes"] == {"cell_type": {"Platelet": 14}, "lineage": {"other": 14}}  # reported
    assert m["restarts"] == 0
    resumed = finetune(_cfg(*args, "train.max_steps=36"))  # the same run name: continues from the last checkpoint
    assert resumed["metrics"]["step"] == 36 and resumed["metrics"]["restarts"] == 1
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run goes on
    losses = mlflow.MlflowClient(resumed["tracking_uri"]).get_metric_history(resumed["mlflow_run_id"], "loss")
    assert [h.step for h in sorted(losses, key=lambda h: h.step)] == [10, 20, 30]  # none logged twice
    # the resume contract: another split would evaluate on cells the model may have trained on
    with pytest.raises(ValueError, match=r"started with other .*split.cells_sha256.*split.test_fraction.*train.run_name=NEW_NAME"):
        finetune(_cfg(*args, "train.max_steps=36", "split.test_fraction=0.3"))
    again = finetune(_cfg(*args, "train.max_steps=36"))  # the budget is spent: no 37th step
    assert again["metrics"]["step"] == 36 and again["metrics"]["restarts"] == 2
