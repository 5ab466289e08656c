"""Rings 2-3 of hyperparameter search: a 3-trial study of 2-worker trials on real PBMC3k cells, tracked on a real
MLflow server, interrupted by killing its driver and resumed; ASHA stops a deliberately bad trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml

from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.settings import load_config
from geneformer_ray.hpo.config import TRIAL_RECORDS

from test_finetune import LINEAGE

FINETUNE = Path(__file__).parent.parent / "jobs" / "configs" / "finetune_cell_type.yaml"
GOOD_LR, BAD_LR = 3.0e-3, 0.5


def _study_file(tmp_path: Path, corpus: Path, tracking_uri: str) -> Path:
    derived = yaml.safe_load(LINEAGE.partition("=")[2])  # {lineage: {source: cell_type, ...}}
    study = {
        "study": {
            "finetune": str(FINETUNE),
            "finetune_set": [
                f"data.corpus={corpus}", "data.max_cells=400", "data.batch_size=16", "model.init_from=null",
                "model.flavour=tiny", "task.label_column=lineage",
                "task.derived_columns=" + json.dumps(derived), "task.baseline=false",
                "train.epochs=1", "train.evals_per_epoch=2", "train.max_failures=0", "optim.warmup_steps=2",
                f"tracking.uri={tracking_uri}", "tracking.register_as=gf-tiny-lineage-tuned",
            ],
            "name": "lineage", "storage_path": str(tmp_path / "studies"), "num_trials": 3,
            "metric": "val_roc_auc", "seed": 0, "grace_period": 1, "reduction_factor": 2,
            "max_concurrent_trials": 1,
            # a good point first, so ASHA has a rung value to stop the huge learning rate against
            "points_to_evaluate": [{"optim.lr": GOOD_LR, "optim.schedule": "linear"},
                                   {"optim.lr": BAD_LR, "optim.schedule": "linear"}],
        },
        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0]}, "optim.schedule": {"choice": ["linear", "cosine"]}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@contextmanager
def _tune(config: Path, log: Path, *extra: str):
    """A `geneformer-ray tune` driver joined to the session's Ray, its output in ``log`` (a file, not a pipe:
    nobody reads a pipe while the test waits, and a full one would stall the driver). Always ended on exit,
    so a failed assertion never leaves a study holding the session's CPUs."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "geneformer_ray.cli", "tune", "--config", str(config), *extra],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had finished
            pass
        proc.wait(timeout=60)


def _tail(log: Path) -> str:
    return log.read_text()[-6000:] if log.exists() else ""


def test_study_interrupted_resumed_tracked_and_its_best_config_reruns(ray_session, pbmc3k_v1_corpus, tmp_path, mlflow_server):
    config = _study_file(tmp_path, pbmc3k_v1_corpus, mlflow_server)
    study_dir = tmp_path / "studies" / "lineage"
    records = study_dir / TRIAL_RECORDS

    # 1. start the study, kill its driver once the first trial has completed
    first_log, resumed_log = tmp_path / "first.log", tmp_path / "resumed.log"
    with _tune(config, first_log) as first:
        deadline = time.time() + 600
        while not (records.exists() and any(records.glob("*.json"))):
            assert first.poll() is None, _tail(first_log)
            assert time.time() < deadline, "the first trial did not complete in 10 minutes:\n" + _tail(first_log)
            time.sleep(1)
        os.killpg(first.pid, signal.SIGKILL)
    (done,) = records.glob("*.json")
    done_mtime = done.stat().st_mtime

    # 2. a new study in the same folder is refused; --resume finishes the budget
    refused = subprocess.run([sys.executable, "-m", "geneformer_ray.cli", "tune", "--config", str(config)],
                             env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    with _tune(config, resumed_log, "--resume") as resumed:
        try:
            resumed.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail("the resumed study did not finish in 15 minutes:\n" + _tail(resumed_log))
    out = resumed_log.read_text()
    assert resumed.returncode == 0, out[-6000:]
    assert done.stat().st_mtime == done_mtime  # the completed trial was not run again

    # 3. outputs: 3 distinct trials, the huge learning rate stopped early by ASHA
    with open(study_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3, out[-6000:]
    by_lr = {float(r["optim.lr"]): r for r in rows}
    good, bad = by_lr[GOOD_LR], by_lr[BAD_LR]
    assert good["status"] == "completed" and bad["status"] == "early_stopped", (rows, out[-6000:])
    assert int(bad["evaluations"]) < int(good["evaluations"])
    assert float(bad["epochs_spent"]) < float(good["epochs_spent"])
    assert "stopped early by ASHA" in out and "best trial" in out
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (study_dir / plot).stat().st_size > 10_000

    # 4. MLflow: 1 parent + 3 child runs with params, curves and statuses; the best model registered
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("geneformer-finetune")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("geneformer.study") == "lineage"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and {c.data.tags["trial_id"] for c in children} == {r["trial_id"] for r in rows}
    status = {c.data.tags["trial_id"]: (c.data.tags["tune.status"], c.info.status) for c in children}
    assert status[bad["trial_id"]] == ("early_stopped", "KILLED") and status[good["trial_id"]] == ("completed", "FINISHED")
    assert all(len(client.get_metric_history(c.info.run_id, "val_roc_auc")) >= 1 for c in children)
    assert all("optim.lr" in c.data.params for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_early_stopped"] >= 1
    version = client.search_model_versions("name='gf-tiny-lineage-tuned'")[0]
    best_row = max((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["val_roc_auc"]))
    assert version.run_id == best_row["mlflow_run_id"]

    # 5. the best config is a fine-tuning config as it stands, and the best model is there
    best = load_config(FinetuneConfig, study_dir / "best_config.yaml")
    assert best.optim.lr == pytest.approx(float(best_row["optim.lr"])) and best.data.max_cells == 400
    assert (study_dir / "best_model" / "config.json").exists()
    from geneformer_ray.cli import main

    assert main(["finetune", "--config", str(study_dir / "best_config.yaml"), "--set", f"train.storage_path={tmp_path / 'rerun'}",
                 "--set", "tracking.uri=none"]) == 0
