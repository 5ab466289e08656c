"""Hyperparameter search over fine-tuning: Ray Tune + Optuna (TPE, seeded) + ASHA, tracked in MLflow.

    study, base = load_study("jobs/configs/tune_cell_type.yaml", ["study.num_trials=8"])   # geneformer_ray.hpo.config
    summary = tune_study(study, base)      # geneformer-ray tune --config ... [--resume]
    print(format_study_summary(summary))   # geneformer_ray.hpo.outputs

The study config names a fine-tuning config (any task) and a search space over its fields by dotted
name. Each trial is a Tune driver function that prepares the task and fits its own multi-worker
``TorchTrainer`` (the Ray 2.60 pattern: Train reports reach Tune through ``TuneReportCallback``);
ASHA stops trials on the validation metric reported at every evaluation. MLflow: one parent run for
the study, one child run per trial (its params, metric curves, and status completed / early-stopped
/ failed). The study folder gets ``best_config.yaml`` (accepted unchanged by ``geneformer-ray
finetune``), ``best_model/``, ``results.csv`` and Optuna's optimisation-history and
parameter-importance plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import ray
import ray.data
from optuna.trial import TrialState
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from geneformer_ray.console import console_open, progress_bar
from geneformer_ray.files import write_json
from geneformer_ray.hpo.config import TRIAL_RECORDS, StudyConfig, StudyFile, apply_params, default_metric
from geneformer_ray.hpo.outputs import mark_child_runs, trial_rows, trial_runs, write_outputs
from geneformer_ray.runtime import plan_cluster
from geneformer_ray.tracking import register_run_artifact, start_tracking
from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.train.finetune import fit_split
from geneformer_ray.train.prepare import prepare_task

# mlflow is imported where a study's runs are looked up: its import costs ~2.6 s in every trial process,
# and studies with tracking off never need it.


def max_concurrent_trials(plan, workers_per_trial: int, cpus_per_worker: int, resources: dict) -> int:
    """Trials that fit at once: every trial holds ``workers_per_trial`` accelerators (or CPUs) plus one
    CPU for its driver, and one CPU stays free for Ray Data, so no trial waits on a device another holds."""
    cpus = int(resources.get("CPU", 0))
    by_cpu = (cpus - 1) // (workers_per_trial * cpus_per_worker + 1)
    if plan.kind == "cpu":
        fit = by_cpu
    else:
        fit = min(int(resources.get(plan.resource, 0)) // workers_per_trial, by_cpu)
    if fit < 1:
        have = f"{int(resources.get(plan.resource, 0))} {plan.resource}" if plan.kind != "cpu" else f"{cpus} CPUs"
        raise ValueError(
            f"one trial needs {workers_per_trial} workers x {cpus_per_worker} CPU(s)"
            + (f" and {workers_per_trial} {plan.resource}" if plan.kind != "cpu" else "")
            + f", one CPU for the trial driver and one for Ray Data, but the cluster has {have} "
            f"({cpus} CPUs); lower train.num_workers in the fine-tuning config or add nodes")
    return fit


# -- one trial (a Tune driver function) --------------------------------------------------------------
def run_trial(params: dict, *, base: dict, parent_run_id: str | None, study_dir: str) -> None:
    trial_id = tune.get_context().get_trial_id()
    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's trial table is the progress display
    record_path = Path(study_dir) / TRIAL_RECORDS / f"{trial_id}.json"
    if record_path.exists():  # completed before an interruption that Tune's state did not see: report, do not retrain
        tune.report(json.loads(record_path.read_text())["metrics"])
        return
    cfg = apply_params(base, params)
    cfg.train.run_name = f"trial_{trial_id}"
    prepared = prepare_task(cfg)
    plan = plan_cluster(cfg.accelerator)  # inside the trial's process: Ray is up, the plan is the driver's
    tags = {"trial_id": trial_id, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    summary = fit_split(cfg, plan, prepared, prepared["splits"][0], run_name=cfg.train.run_name, tags=tags,
                   callbacks=[TuneReportCallback()], tracking_run_id=_unfinished_child_run(cfg, trial_id))
    record = {"trial_id": trial_id, "model": summary["model"], "mlflow_run_id": summary["mlflow_run_id"],
              "params": params, "metrics": {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}}
    write_json(record_path, record)


def _unfinished_child_run(cfg: FinetuneConfig, trial_id: str) -> str | None:
    """The MLflow run an interrupted attempt of this trial left open: the restarted trial continues it
    (one child run per trial, however often the study was interrupted)."""
    runs = trial_runs(cfg, trial_id)
    return runs[0].info.run_id if runs else None


# -- the study (driver) --------------------------------------------------------------------------------
def tune_study(study: StudyFile, base: FinetuneConfig, *, resume: bool = False) -> dict:
    """Run the study (or, with ``resume``, continue an interrupted one in the same folder) and write its outputs."""
    s = study.study
    study_dir = Path(s.storage_path) / s.name
    experiment = study_dir / "tune"  # Tune's own state: trials, searcher, scheduler
    saved = _check_resume(study, study_dir, experiment, resume)
    (study_dir / TRIAL_RECORDS).mkdir(parents=True, exist_ok=True)
    base.train.storage_path = str(study_dir)  # trials' runs, checkpoints and the MLflow store live in the study
    base.task.baseline = False
    register_as, base.tracking.register_as = base.tracking.register_as, None  # only the best model is registered
    plan = plan_cluster(base.accelerator, num_workers=base.train.num_workers)
    fit = max_concurrent_trials(plan, base.train.num_workers, base.accelerator.cpus_per_worker, ray.cluster_resources())
    concurrent = min(s.max_concurrent_trials or fit, fit, s.num_trials)
    metric = s.metric or default_metric(base)

    parent = start_tracking(base.tracking_uri(), experiment=base.tracking.experiment, run_name=s.name, rank=0,
                            params={"study": s.to_dict(), "space": study.space}, run_id=saved.get("mlflow_run_id"),
                            artifact_location=base.artifact_location(), tags={"geneformer.study": s.name})
    write_json(study_dir / "study.json", {"name": s.name, "space": study.space, "num_trials": s.num_trials,
                                           "mlflow_run_id": getattr(parent, "run_id", None)})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), parent_run_id=getattr(parent, "run_id", None),
                             study_dir=str(study_dir)),
        {"CPU": 1})
    if resume:  # Tune restores the searcher, the scheduler and every trial's state; finished trials are not re-run
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    else:
        searcher = _searcher(metric=metric, mode=s.mode, sampler=_sampler(s),
                             points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None)
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor, max_t=10_000) if s.scheduler == "asha" else FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space={name: _tune_dimension(spec) for name, spec in study.space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=s.num_trials, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(study_dir), verbose=1,
                                      callbacks=[TrialProgress(metric, s.mode)]),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, study, metric, study_dir)
    mark_child_runs(base, rows)
    summary = write_outputs(study, base, rows, metric, study_dir)
    summary.update({"max_concurrent_trials": concurrent, "tracking_uri": base.tracking_uri(),
                    "mlflow_run_id": getattr(parent, "run_id", None), "resumed": resume})
    best = summary.get("best") or {}
    if register_as and best.get("mlflow_run_id") and base.tracking_uri():
        summary["registered_version"] = _register_best(base.tracking_uri(), best["mlflow_run_id"], register_as)
    parent.log_metrics({f"best_{metric}": best.get(metric, math.nan), "trials_completed": summary["counts"]["completed"],
                        "trials_early_stopped": summary["counts"]["early_stopped"],
                        "trials_failed": summary["counts"]["failed"], "epochs_spent": summary["epochs_spent"]}, step=0)
    for name in ("results.csv", "best_config.yaml", "optimization_history.png", "param_importances.png"):
        if (study_dir / name).exists():
            parent.log_artifact(study_dir / name)
    parent.finish()
    return summary


class TrialProgress(tune.Callback):
    """The study's progress display on a quiet console: one bar over its trials (finished, stopped early
    or failed; those of an interrupted run count when it is resumed) with the best metric so far."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode, self.best, self.bar = metric, mode, None, None

    def __getstate__(self) -> dict:  # Tune keeps its callbacks with the experiment for a resume: not the bar
        return {**self.__dict__, "bar": None}

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        if console_open():
            self.bar = progress_bar(total=total_num_samples, desc="trials", unit="trial")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            self.best = value if better else self.best

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.bar is None:
            return
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        shown = self.bar.postfix or ""
        if self.best is not None and f"{self.best:.4g}" not in shown:
            self.bar.set_postfix({f"best {self.metric}": f"{self.best:.4g}"}, refresh=done == self.bar.n)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)

    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_end(0, trials)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _check_resume(study: StudyFile, study_dir: Path, experiment: Path, resume: bool) -> dict:
    """A new study never overwrites an old one; a resumed one must be the same study (same space and budget)."""
    state_file = study_dir / "study.json"
    if not resume:
        if experiment.exists():
            raise ValueError(f"study folder {study_dir} already holds a study; pass --resume to continue it, "
                             "or choose another study.name or study.storage_path")
        return {}
    if not tune.Tuner.can_restore(str(experiment)) or not state_file.exists():
        raise ValueError(f"--resume: {study_dir} holds no interrupted study (no Tune state in {experiment}); "
                         "run without --resume to start it")
    saved = json.loads(state_file.read_text())
    for key, now in (("space", study.space), ("num_trials", study.study.num_trials)):
        if saved.get(key) != now:
            raise ValueError(f"--resume: the study in {study_dir} was started with {key}={saved.get(key)!r}, not {now!r}; "
                             "resume it with its own config, or start a new study under another study.name")
    return saved


def _register_best(uri: str, run_id: str, name: str) -> str:
    import mlflow

    return str(register_run_artifact(mlflow.MlflowClient(uri), run_id, name, "model"))


def _searcher(**kwargs):
    """Ray Tune's ``OptunaSearch``, except that a trial ASHA stopped is told to Optuna as PRUNED (its curve
    so far was reported at every evaluation), not as COMPLETE with a value from part-way through its
    training: TPE then ranks stopped trials below every finished one, as it does with Optuna's own pruners,
    instead of mixing quarter-epoch values with final ones. A finished trial's last report carries
    ``final`` (the fine-tuning loop's last report); a stopped trial's last report does not."""
    class PruningAwareOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            stopped = bool(result) and not error and not result.get("final") and trial_id not in self._completed_trials
            if not stopped or trial_id not in self._ot_trials:
                return super().on_trial_complete(trial_id, result, error)
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)

    return PruningAwareOptunaSearch(**kwargs)


def _sampler(s: StudyConfig):
    if s.searcher == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    startup = s.startup_trials or min(10, max(2, s.num_trials // 3))  # Optuna's 10 would make a small study random
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup)


def _tune_dimension(spec: dict):
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(values)
    if kind == "randint":
        return tune.randint(int(values[0]), int(values[1]) + 1)  # inclusive of high
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(float(values[0]), float(values[1]))
