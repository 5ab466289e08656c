"""Ring 1 of hyperparameter search: the study config is checked before any trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from geneformer_ray.runtime import AcceleratorConfig, plan_accelerator
from geneformer_ray.hpo.config import apply_params, default_metric
from geneformer_ray.hpo.config import load_study as _load_study
from geneformer_ray.hpo.study import max_concurrent_trials

STUDY = "jobs/configs/tune_cell_type.yaml"
# The shipped study starts from the quickstart's model; these checks must not need it (CI has no runs/ folder).
NO_CHECKPOINT = "study.finetune_set=[task.baseline=false, train.eval_every=20, model.init_from=null]"


def load_study(path, overrides):
    return _load_study(path, [NO_CHECKPOINT, *overrides])


def test_the_shipped_study_loads_with_its_fine_tuning_config():
    study, base = load_study(STUDY, ["study.num_trials=3"])
    assert study.study.num_trials == 3 and base.task.label_column == "cell_type"
    assert study.study.finetune.endswith("jobs/configs/finetune_cell_type.yaml")  # relative to the study file
    assert base.train.eval_every == 20 and base.task.baseline is False  # the study's finetune_set applied
    assert default_metric(base) == "val_macro_f1"
    cfg = apply_params(base.to_dict(), {"optim.lr": 3e-4, "model.freeze_layers": 1, "data.batch_size": 8})
    assert (cfg.optim.lr, cfg.model.freeze_layers, cfg.data.batch_size) == (3e-4, 1, 8)
    assert base.optim.lr != 3e-4  # the base config is not touched


@pytest.mark.parametrize("space, message", [
    ("{optim.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}}", r"space key 'optim.learning_rate' is not a fine-tuning field"),
    ("{lr: {loguniform: [1.0e-5, 1.0e-3]}}", r"space key 'lr' is not a fine-tuning field"),
    ("{optim.lr: {loguniform: [1.0e-3, 1.0e-5]}}", r"range \[0.001, 1e-05\] is empty or inverted"),
    ("{optim.weight_decay: {uniform: [0.1, 0.1]}}", r"is empty or inverted"),
    ("{optim.lr: {loguniform: [0, 1.0e-3]}}", r"loguniform needs low > 0"),
    ("{optim.schedule: {choice: []}}", r"choice needs a non-empty list"),
    ("{optim.lr: {normal: [0, 1]}}", r"give one of loguniform, uniform, randint, choice"),
    ("{optim.schedule: {choice: [linear, sawtooth]}}", r"value 'sawtooth' makes an invalid fine-tuning config"),
    ("{}", r"space is empty"),
])
def test_bad_search_spaces_are_refused_with_the_fix(space, message):
    with pytest.raises(ValueError, match=message):
        load_study(STUDY, [f"space={space}"])


def test_bad_study_settings_are_refused():
    with pytest.raises(ValueError, match="study.searcher='grid'"):
        load_study(STUDY, ["study.searcher=grid"])
    with pytest.raises(ValueError, match="study.num_trials=0"):
        load_study(STUDY, ["study.num_trials=0"])
    with pytest.raises(ValueError, match=r"points_to_evaluate names \['optim.eps'\]"):
        load_study(STUDY, ["study.points_to_evaluate=[{optim.eps: 1.0e-8}]"])
    with pytest.raises(ValueError, match="does not exist"):
        load_study(STUDY, ["study.finetune=missing.yaml"])


def test_concurrent_trials_fit_the_cluster_and_leave_room_for_ray_data():
    gpu = plan_accelerator(AcceleratorConfig(), {"CPU": 64.0, "GPU": 8.0})
    assert max_concurrent_trials(gpu, 2, 4, {"CPU": 64.0, "GPU": 8.0}) == 4  # devices bound it
    assert max_concurrent_trials(gpu, 2, 4, {"CPU": 19.0, "GPU": 8.0}) == 2  # CPUs bound it: 2 x (2 x 4 + 1) + 1
    cpu = plan_accelerator(AcceleratorConfig(), {"CPU": 4.0})
    assert max_concurrent_trials(cpu, 2, 1, {"CPU": 4.0}) == 1
    with pytest.raises(ValueError, match=r"one trial needs 4 workers x 1 CPU\(s\) and 4 GPU.*cluster has 2 GPU"):
        max_concurrent_trials(gpu, 4, 1, {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="lower train.num_workers"):
        max_concurrent_trials(cpu, 4, 1, {"CPU": 4.0})


def test_fine_tuning_overrides_reach_the_trials_and_study_overrides_the_study():
    study, base = load_study(STUDY, ["tracking.uri=none", "train.num_workers=1", "study.num_trials=2"])
    assert base.tracking_uri() is None and base.train.num_workers == 1 and study.study.num_trials == 2
    assert study.study.finetune_set[-2:] == ["tracking.uri=none", "train.num_workers=1"]
    with pytest.raises(ValueError, match="startup_trials=0 must be at least 1"):
        load_study(STUDY, ["study.startup_trials=0"])


def test_one_dimension_of_the_space_is_changed_or_dropped_by_its_dotted_name(tmp_path):
    study, base = load_study(STUDY, ["space.optim.lr={loguniform: [1.0e-3, 1.0e-2]}", "space.train.epochs=null",
                                     "space.optim.eps={choice: [1.0e-8, 1.0e-6]}", "train.epochs=1"])
    assert study.space["optim.lr"] == {"loguniform": [1.0e-3, 1.0e-2]} and study.space["optim.eps"]["choice"] == [1.0e-8, 1.0e-6]
    assert "train.epochs" not in study.space and base.train.epochs == 1  # not searched: the config's value stands
    assert study.space["data.batch_size"] == {"choice": [8, 16, 32]}  # the others are kept
    with pytest.raises(ValueError, match=r"space.optim.lr: loguniform range \[0.1, 0.01\] is empty or inverted"):
        load_study(STUDY, ["space.optim.lr={loguniform: [0.1, 0.01]}"])
    with pytest.raises(ValueError, match="space key 'optim.learning_rate' is not a fine-tuning field"):
        load_study(STUDY, ["space.optim.learning_rate={loguniform: [1.0e-3, 1.0e-2]}"])
    # a study file without a space: the whole space from the command line
    bare = tmp_path / "bare.yaml"
    bare.write_text(f"study:\n  finetune: {Path(STUDY).absolute().parent / 'finetune_cell_type.yaml'}\n")
    study, _ = load_study(bare, ["space.optim.lr={loguniform: [1.0e-4, 1.0e-3]}", "space.model.freeze_layers={choice: [0, 1]}"])
    assert study.space == {"optim.lr": {"loguniform": [1.0e-4, 1.0e-3]}, "model.freeze_layers": {"choice": [0, 1]}}


def test_trials_asha_stopped_are_pruned_for_optuna_and_finished_ones_complete():
    """TPE must not read a quarter-epoch value of a stopped trial as that configuration's result."""
    import optuna
    from optuna.trial import TrialState
    from ray import tune

    from geneformer_ray.hpo.study import _searcher

    searcher = _searcher(space={"optim.lr": tune.loguniform(1e-4, 1e-2)}, metric="val_macro_f1", mode="max",
                         sampler=optuna.samplers.RandomSampler(seed=0))
    for trial in ("stopped", "finished", "failed"):
        assert "optim.lr" in searcher.suggest(trial)
    searcher.on_trial_result("stopped", {"val_macro_f1": 0.30, "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"val_macro_f1": 0.30, "training_iteration": 1})  # ASHA: no "final"
    for step, value in ((1, 0.20), (2, 0.45)):
        searcher.on_trial_result("finished", {"val_macro_f1": value, "training_iteration": step})
    searcher.on_trial_complete("finished", {"val_macro_f1": 0.50, "training_iteration": 3, "final": True})
    searcher.on_trial_complete("failed", None, error=True)
    stopped, finished, failed = searcher._ot_study.trials
    assert (stopped.state, finished.state, failed.state) == (TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL)
    assert stopped.intermediate_values == {1: 0.30} and finished.value == 0.50
    searcher.on_trial_complete("stopped", {"val_macro_f1": 0.30})  # a repeated completion changes nothing
    assert searcher._ot_study.trials[0].state == TrialState.PRUNED
