"""What a finished (or resumed) study leaves behind: one row per trial, the trials' MLflow child runs
closed with their status, ``results.csv``, ``best_config.yaml``, ``best_model/``, Optuna's plots, and the
summary a person reads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from geneformer_ray.files import atomic_file, write_text_atomic
from geneformer_ray.hpo.config import TRIAL_RECORDS, StudyFile, apply_params
from geneformer_ray.models.folders import publish_model
from geneformer_ray.plots import pyplot, save_figure
from geneformer_ray.settings import load_config
from geneformer_ray.train.config import FinetuneConfig

# mlflow is imported where a study's runs are looked up: its import costs ~2.6 s in every trial process,
# and studies with tracking off never need it.


def trial_rows(grid, study: StudyFile, metric: str, study_dir: Path) -> list[dict]:
    """One row per trial. A trial is completed when its driver function wrote its record (after the
    final evaluation), failed when it raised, and otherwise stopped early by the scheduler."""
    rows = []
    for result in grid:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        record_path = study_dir / TRIAL_RECORDS / f"{trial_id}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        history = result.metrics_dataframe
        values = history[metric].dropna().tolist() if history is not None and metric in history else []
        epochs = float(history["epochs_done"].max()) if history is not None and "epochs_done" in history else 0.0
        status = "failed" if result.error is not None else "completed" if record else "early_stopped"
        rows.append({"trial_id": trial_id, "status": status, **{k: (result.config or {}).get(k) for k in study.space},
                     metric: values[-1] if values else math.nan,
                     f"best_{metric}": (max if study.study.mode == "max" else min)(values) if values else math.nan,
                     "evaluations": len(values), "epochs_spent": epochs if epochs == epochs else 0.0,
                     "model": record.get("model", ""), "mlflow_run_id": record.get("mlflow_run_id", "")})
    return rows


def trial_runs(cfg: FinetuneConfig, trial_id: str) -> list:
    """The MLflow runs tagged with a trial's id (its child run), none when tracking is off."""
    if cfg.tracking_uri() is None:
        return []
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.trial_id = '{trial_id}'") if experiment else []


def mark_child_runs(base: FinetuneConfig, rows: list[dict]) -> None:
    """Completed trials' runs are FINISHED by their workers; stopped and failed ones are closed here."""
    if base.tracking_uri() is None:
        return
    import mlflow

    client = mlflow.MlflowClient(base.tracking_uri())
    for row in rows:
        for run in trial_runs(base, row["trial_id"]):
            client.set_tag(run.info.run_id, "tune.status", row["status"])
            if row["status"] != "completed":
                client.set_terminated(run.info.run_id, status="KILLED" if row["status"] == "early_stopped" else "FAILED")
            row["mlflow_run_id"] = run.info.run_id


def write_outputs(study: StudyFile, base: FinetuneConfig, rows: list[dict], metric: str, study_dir: Path) -> dict:
    s = study.study
    finished = [r for r in rows if r["status"] == "completed" and r[metric] == r[metric]]
    sign = 1 if s.mode == "max" else -1
    best = max(finished, key=lambda r: sign * r[metric]) if finished else None
    _write_csv(study_dir / "results.csv", rows)
    summary = {"study_dir": str(study_dir), "metric": metric, "trials": rows, "results": str(study_dir / "results.csv"),
               "counts": {k: sum(r["status"] == k for r in rows) for k in ("completed", "early_stopped", "failed")},
               "epochs_spent": float(sum(r["epochs_spent"] for r in rows)), "best": best}
    if best is not None:
        params = {k: best[k] for k in study.space}
        cfg = apply_params(base.to_dict(), params)
        original = load_config(FinetuneConfig, s.finetune, s.finetune_set)
        cfg.train.storage_path, cfg.train.run_name = original.train.storage_path, f"{s.name}_best"
        cfg.task.baseline = original.task.baseline
        write_text_atomic(study_dir / "best_config.yaml",
                    f"# best trial {best['trial_id']} of study {s.name}: {metric} {best[metric]:.4f}\n"
                    f"#   geneformer-ray finetune --config {study_dir / 'best_config.yaml'}\n"
                    + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if best["model"] and Path(best["model"]).exists():
            summary["best_model"] = str(publish_model(best["model"], study_dir / "best_model"))
        summary["best_config"] = str(study_dir / "best_config.yaml")
        summary["best_params"] = params
    summary["plots"] = _optuna_plots(study, rows, metric, study_dir)
    return summary


def _optuna_plots(study: StudyFile, rows: list[dict], metric: str, study_dir: Path) -> list[str]:
    """Optuna's own plots, from an in-memory study holding every trial's parameters and final value."""
    pyplot()  # Optuna draws with matplotlib: on the Agg backend
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for name, spec in study.space.items():
        kind, values = next(iter(spec.items()))
        distributions[name] = (CategoricalDistribution(values) if kind == "choice" else
                               IntDistribution(int(values[0]), int(values[1])) if kind == "randint" else
                               FloatDistribution(float(values[0]), float(values[1]), log=kind == "loguniform"))
    ostudy = optuna.create_study(direction="maximize" if study.study.mode == "max" else "minimize")
    for row in rows:
        params = {k: row[k] for k in study.space if row.get(k) is not None}
        if len(params) != len(study.space):
            continue
        complete = row["status"] == "completed" and row[metric] == row[metric]
        ostudy.add_trial(create_trial(params=params, distributions=distributions, value=row[metric] if complete else None,
                                      state=TrialState.COMPLETE if complete else
                                      TrialState.PRUNED if row["status"] == "early_stopped" else TrialState.FAIL))
    written = []
    plots = [("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history)]
    if len(study.space) > 1:
        plots.append(("param_importances.png", optuna.visualization.matplotlib.plot_param_importances))
    for name, plot in plots:
        try:
            ax = plot(ostudy)
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ completed trials
            print(f"{name}: not drawn ({err})", flush=True)
            continue
        ax = ax[0] if hasattr(ax, "__len__") else ax
        ax.set_title(f"{study.study.name}: {ax.get_title()} ({metric})")
        ax.figure.tight_layout()
        ax.figure.set_dpi(120)
        save_figure(ax.figure, study_dir / name)
        written.append(str(study_dir / name))
    return written


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def format_study_summary(summary: dict) -> str:
    counts = summary["counts"]
    lines = [f"study {summary['study_dir']}: {len(summary['trials'])} trials, {counts['completed']} completed, "
             f"{counts['early_stopped']} stopped early by ASHA, {counts['failed']} failed; "
             f"{summary['epochs_spent']:.1f} training epochs in all (at most {summary['max_concurrent_trials']} at once)"]
    best = summary.get("best")
    if best:
        lines.append(f"best trial {best['trial_id']}: {summary['metric']} {best[summary['metric']]:.4f} with {summary['best_params']}")
        lines.append(f"best config (for geneformer-ray finetune): {summary['best_config']}")
        if summary.get("best_model"):
            lines.append(f"best model: {summary['best_model']}")
    lines.append(f"results table: {summary['results']}")
    for plot in summary["plots"]:
        lines.append(f"plot: {plot}")
    if summary.get("tracking_uri"):
        lines.append(f"MLflow: {summary['tracking_uri']} study run {summary['mlflow_run_id']} (one child run per trial)")
    return "\n".join(lines)
