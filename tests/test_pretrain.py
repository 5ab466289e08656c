"""Rings 1-2: config errors, schedules, checkpoint state, and 2-worker gloo DDP pretraining of `tiny`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.settings import load_config
from geneformer_ray.models.flavours import MaskedGeneObjective, build_model
from geneformer_ray.train.checkpoint import load_checkpoint, save_checkpoint
from geneformer_ray.train.schedule import build_scheduler, lr_factor
from geneformer_ray.data.vocab import load_vocab


TINY = "geneformer_ray/resources/configs/pretrain_tiny.yaml"


# -- ring 1 ---------------------------------------------------------------------------------------
def test_config_errors_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key optim.learning_rate: known in optim: lr, "):
        load_config(PretrainConfig, None, ["data.corpus=x", "optim.learning_rate=0.1"])
    with pytest.raises(ValueError, match=r"train.num_workers: input should be a valid integer.*\(got 'two'\)"):
        load_config(PretrainConfig, None, ["data.corpus=x", "train.num_workers=two"])
    with pytest.raises(ValueError, match="data.corpus is empty"):
        load_config(PretrainConfig, None, [])
    with pytest.raises(ValueError, match="exactly one of data.batch_size and data.max_tokens"):
        load_config(PretrainConfig, None, ["data.corpus=x", "data.max_tokens=4096"])
    with pytest.raises(ValueError, match="model.flavour='gf-99L' is unknown"):
        load_config(PretrainConfig, None, ["data.corpus=x", "model.flavour=gf-99L"])
    with pytest.raises(ValueError, match="accelerator.type='tpu'"):
        load_config(PretrainConfig, None, ["data.corpus=x", "accelerator.type=tpu"])
    with pytest.raises(ValueError, match="data.pad_to_multiple=0 must be between 1 and 1024"):
        load_config(PretrainConfig, None, ["data.corpus=x", "data.pad_to_multiple=0"])
    cfg = load_config(PretrainConfig, TINY, ["optim.betas=[0.9, 0.98]", "train.max_steps=7"])
    assert cfg.optim.betas == (0.9, 0.98) and cfg.train.max_steps == 7
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg  # the Ray boundary round trip
    assert cfg.data.corpus.startswith("/") and cfg.train.storage_path.startswith("/")  # workers run in another cwd


def test_learning_rate_schedules():
    table = [lr_factor(s, schedule="linear", warmup_steps=4, total_steps=12) for s in range(12)]
    assert table[:4] == [0.25, 0.5, 0.75, 1.0] and table[4] == 1.0 and table[8] == 0.5 and table[-1] == 0.125
    cosine = [lr_factor(s, schedule="cosine", warmup_steps=0, total_steps=10) for s in (0, 5, 10)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(100, schedule="constant", warmup_steps=10, total_steps=20) == 1.0


def _train_steps(objective, optimizer, scheduler, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(2, 25_426, (4, 30), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        labels[0, 0] = ids[0, 0]
        objective(ids, torch.ones_like(ids), labels).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _fresh(seed=0):
    objective = MaskedGeneObjective(build_model("tiny", seed=seed))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, schedule="linear", warmup_steps=3, total_steps=20)
    return objective, optimizer, scheduler


def test_checkpoint_resume_restores_everything_exactly(tmp_path):
    vocab = load_vocab("gc30M")
    a = _fresh()
    _train_steps(*a, 5, seed=1)
    save_checkpoint(tmp_path / "ckpt", model=a[0].model, optimizer=a[1], scheduler=a[2], vocab=vocab,
                    progress={"step": 5, "epoch": 0}, config={"x": 1}, tracking_run_id="abc")
    b = _fresh(seed=99)  # different initial weights: everything must come from the checkpoint
    state = load_checkpoint(tmp_path / "ckpt", model=b[0].model, optimizer=b[1], scheduler=b[2], vocab=vocab)
    assert state["progress"] == {"step": 5, "epoch": 0} and state["tracking_run_id"] == "abc"
    assert b[2].last_epoch == a[2].last_epoch == 5 and b[2].get_last_lr() == a[2].get_last_lr()
    for (name, pa), pb in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    # and the continued runs stay identical (same dropout draws: the process shares one torch RNG)
    rng = torch.get_rng_state()
    _train_steps(*a, 3, seed=2)
    torch.set_rng_state(rng)
    _train_steps(*b, 3, seed=2)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a[0].parameters(), b[0].parameters()))
    with pytest.raises(ValueError, match="differs from gc104M"):
        load_checkpoint(tmp_path / "ckpt", model=b[0].model, optimizer=b[1], scheduler=b[2], vocab=load_vocab("gc104M"))


# -- ring 2 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(pbmc3k_v1_corpus):
    return pbmc3k_v1_corpus


def _config(corpus, storage, *extra):
    return load_config(PretrainConfig, TINY, [f"data.corpus={corpus}", f"train.storage_path={storage}", "data.batch_size=4",
                                              "train.log_every=5", "train.val_every=10", "train.checkpoint_every=10",
                                              "optim.warmup_steps=5", "optim.lr=0.003",
                                              "model.output_bias=zero",  # from log(vocab): learning shows in few steps
                                              *extra])


def test_two_worker_ddp_pretraining_learns_is_tracked_and_resumes_on_a_rerun(ray_session, corpus, tmp_path):
    from transformers import BertForMaskedLM

    from geneformer_ray.train.pretrain import pretrain

    summary = pretrain(_config(corpus, tmp_path, "train.max_steps=30", "train.run_name=ddp"))
    m = summary["metrics"]
    assert m["step"] == 30 and m["weights_identical_across_ranks"] is True and m["restarts"] == 0
    assert m["final_loss"] < m["first_loss"] - 0.3  # learning happened
    assert m["val_loss"] == m["val_loss"]  # finite validation loss on the held-out cells
    model = BertForMaskedLM.from_pretrained(summary["model"])  # stock transformers
    assert model.config.geneformer_vocab_name == "gc30M"
    client = mlflow.MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.flavour"] == "tiny" and run.data.params["train.num_workers"] == "2"
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "cells_per_s", "padding_fraction", "data_wait_fraction",
            "step_time_s", "val_loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "model"} <= artifacts
    assert str(tmp_path) in run.info.artifact_uri  # beside the store, not in a worker's cwd
    versions = client.search_model_versions("name='geneformer-tiny'")
    assert versions and versions[0].run_id == run.info.run_id

    # running again with the same name and a higher max_steps continues from the last checkpoint
    second = pretrain(_config(corpus, tmp_path, "train.max_steps=40", "train.run_name=ddp"))
    assert second["metrics"]["step"] == 40
    assert second["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run continues
    assert second["metrics"]["restarts"] == 1 and second["metrics"]["resumed_from_step"] == 30
    history = client.get_metric_history(second["mlflow_run_id"], "loss")
    assert sorted(h.step for h in history) == list(range(5, 41, 5))  # steps 1-30 were not trained twice

    # the resume contract: only budgets and tracking may change; a spent budget takes no further step
    with pytest.raises(ValueError, match=r"started with other data.mlm_probability, optim.lr .*0.003 -> 0.01"):
        pretrain(_config(corpus, tmp_path, "train.max_steps=40", "train.run_name=ddp", "optim.lr=0.01",
                         "data.mlm_probability=0.2"))
    third = pretrain(_config(corpus, tmp_path, "train.max_steps=40", "train.run_name=ddp"))
    assert third["metrics"]["step"] == 40 and third["metrics"]["restarts"] == 2


def test_token_budget_batches_with_gradient_accumulation(ray_session, pbmc3k_subset_corpus, tmp_path):
    """Token budgets give ranks different numbers of batches: they must still stop together (a whole
    epoch). Also: MLflow off (tracking.uri=none), metrics in the run's metrics.jsonl; widths padded to a multiple."""
    from geneformer_ray.train.pretrain import pretrain

    summary = pretrain(_config(pbmc3k_subset_corpus, tmp_path, "data.batch_size=null", "data.max_tokens=8000",
                               "optim.grad_accum_steps=2", "train.epochs=1", "train.max_steps=null", "train.run_name=budget",
                               "optim.schedule=cosine", "accelerator.precision=bf16", "tracking.uri=none",
                               "data.pad_to_multiple=64"))
    m = summary["metrics"]
    assert m["step"] > 10 and m["epoch"] == 1 and m["weights_identical_across_ranks"]
    assert m["final_loss"] < m["first_loss"]
    assert not summary["mlflow_run_id"] and summary["registered_version"] is None
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlartifacts").exists()
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines()]
    assert [w["step"] for w in windows if "loss" in w][:2] == [5, 10] and windows[-1]["step"] == m["step"]
    assert all(0 < w["tokens_per_s"] for w in windows if "tokens_per_s" in w)
    assert all(w["padding_fraction"] < 0.5 for w in windows if "padding_fraction" in w)


# -- ring 3 ---------------------------------------------------------------------------------------
def test_killed_worker_resumes_from_the_last_checkpoint_tracked_on_a_server(ray_session, corpus, tmp_path, mlflow_server):
    """SIGKILL a training worker after a checkpoint: the group restarts from it and finishes;
    the MLflow server holds one run with params, metrics, the model and its registered version."""
    from faults import WorkerKiller

    from geneformer_ray.train.pretrain import pretrain

    storage = tmp_path / "runs"
    killer = WorkerKiller(storage / "killed", checkpoints=2)
    summary = pretrain(_config(corpus, storage, "train.max_steps=40", "train.run_name=killed", "train.max_failures=2",
                               f"tracking.uri={mlflow_server}", "tracking.register_as=gf-tiny-server"))
    killer.join(timeout=5)
    assert killer.killed, "no training worker was found to kill"
    assert summary["metrics"]["step"] == 40 and summary["metrics"]["weights_identical_across_ranks"]
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.max_failures"] == "2"
    m = summary["metrics"]
    assert m["restarts"] == 1 and m["resumed_from_step"] in (10, 20, 30)  # restarted from a checkpoint, not step 0
    steps = [h.step for h in client.get_metric_history(run.info.run_id, "loss")]
    assert all(steps.count(s) == 1 for s in range(5, m["resumed_from_step"] + 1, 5))  # not trained twice
    assert set(steps) == set(range(5, 41, 5))
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.search_model_versions("name='gf-tiny-server'")[0].run_id == run.info.run_id
