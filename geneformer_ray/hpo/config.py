"""Settings of a hyperparameter study: the study section, the search space, and the fine-tuning config
every trial starts from, all checked before any trial runs.

    study, base = load_study("jobs/configs/tune_cell_type.yaml", ["study.num_trials=8"])
    cfg = apply_params(base.to_dict(), {"optim.lr": 1e-4})      # one trial's fine-tuning config
"""

from __future__ import annotations

import copy
from pathlib import Path

from pydantic import Field, model_validator

from geneformer_ray.settings import AbsolutePath, Settings, load_config
from geneformer_ray.train.config import FinetuneConfig

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
TRIAL_RECORDS = "trial_records"  # <study>/trial_records/<trial id>.json, written when a trial completes


class StudyConfig(Settings):
    finetune: str = ""  # the fine-tuning config (YAML) every trial starts from
    finetune_set: list[str] = Field(default_factory=list)  # overrides of it, as with `finetune --set`
    name: str = "study"
    storage_path: AbsolutePath = "runs/tune"  # the study folder is <storage_path>/<name>
    num_trials: int = 8
    metric: str | None = None  # default: val_macro_f1 (cell), val_roc_auc (gene), val_<first column>_macro_f1 (multitask)
    mode: str = "max"
    searcher: str = "tpe"  # tpe (Optuna TPE) | random (Optuna random sampler)
    seed: int = 0
    startup_trials: int | None = None  # TPE's random trials before it models; default a third of the budget (2..10)
    scheduler: str = "asha"  # asha (early stopping at evaluations) | none
    grace_period: int = 1  # evaluations a trial always gets before ASHA may stop it
    reduction_factor: int = 3
    max_concurrent_trials: int | None = None  # default: what the cluster fits (accelerators / workers per trial)
    points_to_evaluate: list[dict] = Field(default_factory=list)  # trials to run first, {dotted name: value}

    @model_validator(mode="after")
    def _check(self):
        if not self.finetune:
            raise ValueError("study.finetune is empty; name a fine-tuning config, e.g. jobs/configs/finetune_cell_type.yaml")
        if self.num_trials < 1:
            raise ValueError(f"study.num_trials={self.num_trials} must be at least 1")
        if self.mode not in ("max", "min"):
            raise ValueError(f"study.mode={self.mode!r}: use max or min")
        if self.searcher not in ("tpe", "random"):
            raise ValueError(f"study.searcher={self.searcher!r}: use tpe or random")
        if self.scheduler not in ("asha", "none"):
            raise ValueError(f"study.scheduler={self.scheduler!r}: use asha or none")
        if self.startup_trials is not None and self.startup_trials < 1:
            raise ValueError(f"study.startup_trials={self.startup_trials} must be at least 1 (or null)")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("study.grace_period must be >= 1 and study.reduction_factor >= 2")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"study.max_concurrent_trials={self.max_concurrent_trials} must be at least 1 (or null)")
        return self


class StudyFile(Settings):
    study: StudyConfig = Field(default_factory=lambda: StudyConfig.model_construct())
    space: dict[str, dict] = Field(default_factory=dict)  # {dotted fine-tuning field: {loguniform: [lo, hi]} ...}

    @model_validator(mode="after")
    def _check(self):
        if not self.space:
            raise ValueError("space is empty; give at least one fine-tuning field, e.g. optim.lr: {loguniform: [1.0e-5, 1.0e-3]}")
        return self


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> tuple[StudyFile, FinetuneConfig]:
    """The study config and its base fine-tuning config, both checked (space keys, ranges) before any trial.
    Overrides of ``study.*``/``space.*`` change the study; any other section (``tracking.uri=...``,
    ``train.num_workers=...``) is a fine-tuning override, applied after ``study.finetune_set``."""
    finetune_sections = set(FinetuneConfig.model_fields)
    ours = [o for o in overrides or [] if o.partition(".")[0].partition("=")[0] not in finetune_sections]
    theirs = [o for o in overrides or [] if o not in ours]
    study = load_config(StudyFile, path, ours)  # space.optim.lr=...: one dimension; space.train.epochs=null: not searched
    study.study.finetune_set = [*study.study.finetune_set, *theirs]
    base_path = Path(study.study.finetune)
    if not base_path.is_absolute() and path is not None and not base_path.exists():
        base_path = Path(path).parent / base_path  # relative to the study file
    study.study.finetune = str(base_path.absolute())
    base = load_config(FinetuneConfig, base_path, study.study.finetune_set)
    for name, spec in study.space.items():
        _check_dimension(base, name, spec)
    for point in study.study.points_to_evaluate:
        unknown = sorted(set(point) - set(study.space))
        if unknown:
            raise ValueError(f"study.points_to_evaluate names {unknown}, which are not in space ({sorted(study.space)})")
    return study, base


def _check_dimension(base: FinetuneConfig, name: str, spec) -> None:
    section, _, leaf = name.partition(".")
    target = getattr(base, section, None) if section in FinetuneConfig.model_fields else None
    if not leaf or not isinstance(target, Settings) or leaf not in type(target).model_fields:
        known = ", ".join(f"{name}.*" for name in FinetuneConfig.model_fields)
        raise ValueError(f"space key {name!r} is not a fine-tuning field; use a dotted field name of the fine-tuning "
                         f"config ({known}), e.g. optim.lr")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"space.{name}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-5, 1.0e-3]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ValueError(f"space.{name}: choice needs a non-empty list of values")
        samples = values
    else:
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)):
            raise ValueError(f"space.{name}: {kind} needs [low, high]; got {values!r}")
        low, high = values
        if not low < high:
            raise ValueError(f"space.{name}: {kind} range [{low}, {high}] is empty or inverted; low must be below high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"space.{name}: loguniform needs low > 0 (got {low})")
        samples = [low, high]
    for sample in samples:  # every value must make a valid fine-tuning config
        try:
            apply_params(base.to_dict(), {name: sample})
        except ValueError as err:
            raise ValueError(f"space.{name}: value {sample!r} makes an invalid fine-tuning config: {err}") from None


def apply_params(base: dict, params: dict) -> FinetuneConfig:
    """A fine-tuning config: ``base`` (a ``FinetuneConfig.to_dict()``) with dotted fields replaced."""
    values = copy.deepcopy(base)
    for name, value in params.items():
        section, leaf = name.split(".", 1)
        values[section][leaf] = value
    return FinetuneConfig.from_dict(values)


def default_metric(base: FinetuneConfig) -> str:
    if base.task.kind == "gene":
        return "val_roc_auc"
    if base.task.kind == "multitask":
        return f"val_{base.task.label_columns[0]}_macro_f1"
    return "val_macro_f1"
