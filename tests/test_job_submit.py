"""Ring 3: `ray start --head` with token authentication, then `ray job submit --working-dir .` of the tokenize,
tiny pretraining and tuning jobs, tracked on a real MLflow server; clients without the token are refused."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from geneformer_ray.data.corpus import read_manifest

from conftest import PBMC_SMALL, forget_ray_address

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def ray_head(env: dict, *, num_cpus: int = 2):
    """A real head node on its own ports and temp dir. Stopped by ending exactly the processes that
    `ray start` created and their children: `ray stop` would also end the test session's Ray, and
    Ray renames its processes, so they cannot be found by command line."""
    import psutil

    temp_dir = Path("/tmp") / f"gfray-head-{uuid.uuid4().hex[:8]}"
    base = 20000 + secrets.randbelow(20000)
    before = set(psutil.pids())
    subprocess.run(["ray", "start", "--head", f"--port={base}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={base + 1}", f"--dashboard-agent-listen-port={base + 2}",
                    f"--ray-client-server-port={base + 3}", "--include-dashboard=true", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    started = [psutil.Process(pid) for pid in set(psutil.pids()) - before if psutil.pid_exists(pid)]
    try:
        yield f"http://127.0.0.1:{base + 1}"
    finally:
        procs = {}
        for proc in started:
            try:
                procs.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        forget_ray_address(base)


@pytest.fixture
def token_env(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": ""}


def submit(address: str, env: dict, *entrypoint: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` from the project root: the job runs the code submitted."""
    command = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *entrypoint]
    start = time.perf_counter()
    for _ in range(30):  # the head's job agent registers a few seconds after `ray start` returns
        proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"{entrypoint[0]}: submit to success in {time.perf_counter() - start:.1f} s")
    return proc


def test_tokenize_pretrain_and_tune_jobs_through_ray_job_submit(token_env, tmp_path, mlflow_server):
    import mlflow

    corpus, runs, studies = tmp_path / "corpus", tmp_path / "runs", tmp_path / "studies"
    with ray_head(token_env, num_cpus=4) as address:
        proc = submit(address, token_env, "jobs/tokenize_corpus.py", str(PBMC_SMALL), "--vocab", "gc30M", "--out", str(corpus),
                      "--obs", "RNA_snn_res.1=cluster", "--val-fraction", "0.1", "--quiet")
        assert "tokenized 80 of 80 cells" in proc.stdout
        assert read_manifest(corpus)["num_cells"] == 80

        # the tiny pretraining job, tracked on the MLflow server
        proc = submit(address, token_env, "jobs/pretrain.py", "--config", "jobs/configs/pretrain_tiny.yaml",
                      "--set", f"data.corpus={corpus}", "--set", f"train.storage_path={runs}", "--set", "train.max_steps=6",
                      "--set", "train.log_every=3", "--set", "train.val_every=6", "--set", "data.val_fraction=0.1",
                      "--set", f"tracking.uri={mlflow_server}")
        assert "succeeded" in proc.stdout and "done: 6 steps" in proc.stdout
        # a calm job log: the bar and the summary; Ray's and the workers' lines in the run folder's log
        log = runs / "pretrain_tiny" / "pretrain.log"
        assert f"log (Ray, workers, libraries): {log}" in proc.stdout and "pretrain: 100%" in proc.stdout
        assert not any(noise in proc.stdout for noise in ("RayTrainWorker", "TrainController", "step 3/6", "Ray Data"))
        assert log.read_text().count("step 3/6") == 1  # once: Ray Train's print patch doubled printed lines
        (model,) = (runs / "pretrain_tiny").glob("checkpoint_*/model")

        # a 1-trial, 1-epoch search over fine-tuning from that model, on the same cluster (test_tune covers studies)
        proc = submit(address, token_env, "jobs/tune.py", "--config", "jobs/configs/tune_cell_type.yaml",
                      "--set", "study.num_trials=1", "--set", "space.train.epochs=null", "--set", "train.epochs=1",
                      "--set", f"study.storage_path={studies}", "--set", f"data.corpus={corpus}",
                      "--set", f"model.init_from={model}", "--set", "task.label_column=cluster", "--set", "task.min_class_size=5",
                      "--set", "split.val_fraction=0.2", "--set", "train.max_failures=0", "--set", "tracking.register_as=null",
                      "--set", f"tracking.uri={mlflow_server}")
        assert "best trial" in proc.stdout and "trials: 100%" in proc.stdout and "Trial status" not in proc.stdout
        assert "Trial status" in (studies / "tune_cell_type" / "tune.log").read_text()  # Tune's tables: in the log
        assert (studies / "tune_cell_type" / "results.csv").read_text().count("\n") == 2  # header + 1 trial

        # MLflow: the pretraining run and the study's parent with its trial
        client = mlflow.MlflowClient(mlflow_server)
        (pretrain_run,) = client.search_runs([client.get_experiment_by_name("geneformer-quickstart").experiment_id])
        assert pretrain_run.info.status == "FINISHED" and len(client.get_metric_history(pretrain_run.info.run_id, "loss")) == 2
        runs_ = client.search_runs([client.get_experiment_by_name("geneformer-finetune").experiment_id])
        (parent,) = [r for r in runs_ if r.data.tags.get("geneformer.study") == "tune_cell_type"]
        assert len([r for r in runs_ if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 1

        # clients without the cluster's token are refused: a wrong token, and none at all
        stranger = {**token_env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "other_token")}
        Path(stranger["RAY_AUTH_TOKEN_PATH"]).write_text(secrets.token_hex(32))
        (tmp_path / "home").mkdir()
        anonymous = {k: v for k, v in token_env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path / "home")}
        for env in (stranger, anonymous):
            refused = subprocess.run(["ray", "job", "submit", "--address", address, "--", "echo", "hi"],
                                     env=env, capture_output=True, text=True, timeout=120)
            assert refused.returncode != 0 and "hi\n" not in refused.stdout
