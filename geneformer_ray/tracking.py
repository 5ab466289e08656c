"""MLflow tracking on rank 0; every other rank gets a logger that does nothing.

    tracker = start_tracking(uri, experiment="geneformer-pretrain", run_name="run1", rank=rank, params=cfg)
    tracker.log_metrics({"loss": 2.3}, step=10)
    tracker.finish()

The tracking URI is always explicit (MLflow's default is a sqlite file in each worker's cwd): a
``sqlite:///`` file under the run's storage, or ``http://host:5000`` for a tracking server; ``None``
turns MLflow off. With ``metrics_file``, rank 0 also appends every metrics dict to that JSON-lines
file (``{"step": 10, "loss": 2.3, ...}``), with or without MLflow.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from geneformer_ray.settings import Settings

# mlflow is imported where a run is opened: its import costs ~2.6 s, which runs with tracking off and
# every rank but 0 never pay.


class TrackingConfig(Settings):
    uri: str | None = None  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<storage_path>/mlflow.db;
    #                         "none": no MLflow (metrics still go to <run folder>/metrics.jsonl)
    experiment: str = "geneformer-pretrain"
    register_as: str | None = None  # registered model name for the final model
    artifact_location: str | None = None  # new experiments' artifact root; default <storage_path>/mlartifacts for sqlite


def _given_uri(tracking: TrackingConfig) -> str | None:
    """tracking.uri, else the cluster's MLflow server from MLFLOW_TRACKING_URI (cluster/ sets it on every node)."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def tracking_uri(tracking: TrackingConfig, storage_path: str | Path) -> str | None:
    """The run's MLflow URI: given, from the environment, or a sqlite file beside the run; None: MLflow off."""
    uri = _given_uri(tracking)
    if uri and uri.lower() == "none":
        return None
    return uri or f"sqlite:///{Path(storage_path).absolute() / 'mlflow.db'}"


def artifact_location(tracking: TrackingConfig, storage_path: str | Path) -> str | None:
    """Explicit, or beside the sqlite store: MLflow's default is relative to each worker's cwd."""
    if tracking.artifact_location or _given_uri(tracking):
        return tracking.artifact_location  # also None when MLflow is off
    return (Path(storage_path).absolute() / "mlartifacts").as_uri()


class NullTracker:
    run_id: str | None = None
    metrics_file: Path | None = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.metrics_file is not None:
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **{k: v if math.isfinite(v) else None for k, v in numeric.items()}}) + "\n")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def register_model(self, name: str, artifact_path: str) -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, *, experiment: str, run_name: str, params: dict | None, run_id: str | None = None,
                 artifact_location: str | None = None, tags: dict | None = None):
        import mlflow

        # a client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for the whole process,
        # which configs read as the cluster's default server
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment_obj = self.client.get_experiment_by_name(experiment)
            experiment_id = experiment_obj.experiment_id if experiment_obj else \
                self.client.create_experiment(experiment, artifact_location=artifact_location)
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)  # mlflow.parentRunId nests it
            run_id = run.info.run_id
            for key, value in flatten(params or {}).items():
                self.client.log_param(run_id, key, value)
        else:
            self.client.update_run(run_id, status="RUNNING")  # resumed after a failure or a re-run
        self.run_id = run_id

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        super().log_metrics(metrics, step)
        now = int(time.time() * 1000)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        batch = [Metric(k, v, now, step) for k, v in numeric.items() if math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory, artifact_path=None):
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def register_model(self, name: str, artifact_path: str) -> str | None:
        return register_run_artifact(self.client, self.run_id, name, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_tracking(uri: str | None, *, experiment: str, run_name: str, rank: int, params: dict | None = None,
                   run_id: str | None = None, artifact_location: str | None = None, tags: dict | None = None,
                   metrics_file: str | Path | None = None) -> NullTracker:
    if rank != 0:
        return NullTracker()
    tracker = NullTracker() if uri is None else MlflowTracker(
        uri, experiment=experiment, run_name=run_name, params=params, run_id=run_id,
        artifact_location=artifact_location, tags=tags)
    tracker.metrics_file = Path(metrics_file) if metrics_file else None
    return tracker


def register_run_artifact(client, run_id: str, name: str, artifact_path: str) -> str:
    """Register a run's artifact folder as a new version of ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered: add a version
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return client.create_model_version(name, source=source, run_id=run_id).version


def log_output_folder(uri: str, experiment: str, run_name: str, params: dict, folder: Path, metrics: dict) -> str:
    """One MLflow run for an inference output folder: parameters, headline metrics, and its plots,
    summary and statistics files."""
    tracker = start_tracking(uri, experiment=experiment, run_name=run_name, rank=0, params=params)
    tracker.log_metrics(metrics, step=0)
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in (".png", ".json", ".csv"):
            tracker.log_artifact(path)
    tracker.finish()
    return tracker.run_id


def log_final_model(cfg, run_name: str, summary: dict) -> str | None:
    """Driver side, once the final checkpoint is persisted: the model folder as the run's ``model``
    artifact, the checkpoint path as a tag, and a registered model version when the config names one."""
    run_id = summary.get("mlflow_run_id")
    if not run_id or cfg.tracking_uri() is None:
        return None
    tracker = MlflowTracker(cfg.tracking_uri(), experiment=cfg.tracking.experiment, run_name=run_name, params=None,
                            run_id=run_id)
    tracker.log_artifacts(summary["model"], "model")
    tracker.set_tags({"checkpoint": summary["checkpoint"]})
    version = tracker.register_model(cfg.tracking.register_as, "model") if cfg.tracking.register_as else None
    tracker.finish()
    return version


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'optim.lr': '0.001', ...} (MLflow params are flat strings, 6,000 chars max)."""
    flat = {}
    for key, value in values.items():
        name = re.sub(r"[^\w\-. :/]", "_", f"{prefix}{key}")  # MLflow's allowed key characters (e.g. 'CD14+ Mono')
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat
