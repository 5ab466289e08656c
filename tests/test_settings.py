"""Ring 1: the one config loader every stage uses: YAML plus --set overrides into the stage's typed
settings, unknown keys refused with the closest valid key, pydantic's errors worded as one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geneformer_ray.hpo.config import StudyFile
from geneformer_ray.infer.config import PerturbConfig
from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.settings import load_config
from geneformer_ray.train.config import FinetuneConfig, PretrainConfig

REPO = Path(__file__).parents[1]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        kind = path.name.split("_")[0]
        if kind == "tune":
            load_config(StudyFile, path)
        else:
            # the fine-tuning configs start from the quickstart's model, which a fresh clone has not made yet
            overrides = ["model.init_from=null"] if kind == "finetune" else []
            cfg = load_config({"pretrain": PretrainConfig, "finetune": FinetuneConfig}[kind], path, overrides)
            assert Path(cfg.data.corpus).is_absolute() and Path(cfg.train.storage_path).is_absolute()
    assert load_config(PretrainConfig, REPO / "geneformer_ray" / "resources" / "configs" / "pretrain_tiny.yaml",
                       ["data.corpus=c"]).model.flavour == "tiny"


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(ValueError, match=r"unknown config key train.num_worker: did you mean train.num_workers\?"):
        load_config(PretrainConfig, None, ["data.corpus=c", "train.num_worker=2"])
    with pytest.raises(ValueError, match=r"unknown config key optimiser: did you mean optim\? known in the top level"):
        load_config(PretrainConfig, None, ["data.corpus=c", "optimiser.lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown config key train.zzz: known in train: num_workers, epochs"):
        load_config(PretrainConfig, None, ["data.corpus=c", "train.zzz=1"])


def test_errors_are_one_line_each_naming_the_key(tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(PretrainConfig, None, ["data.corpus=c", "train.num_workers=many", "optim.lr=fast"])
    message = str(info.value)
    assert "\n" not in message and "https://" not in message
    assert "train.num_workers: input should be a valid integer" in message and "(got 'many')" in message
    assert "optim.lr: input should be a valid number" in message
    with pytest.raises(ValueError, match="^optim.schedule='step': use linear, cosine or constant$"):
        load_config(PretrainConfig, None, ["data.corpus=c", "optim.schedule=step"])
    with pytest.raises(ValueError, match="data.corpus is empty; set it to a corpus folder"):
        load_config(PretrainConfig)  # no data section at all: its defaults are checked too
    with pytest.raises(ValueError, match="task.kind=cell needs task.label_column"):
        load_config(FinetuneConfig, None, ["data.corpus=c"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping of sections"):
        load_config(PretrainConfig, tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="--set 'train.epochs': use section.key=value"):
        load_config(PretrainConfig, None, ["train.epochs"])


def test_values_are_checked_on_assignment_too():
    cfg = load_config(FinetuneConfig, None, ["data.corpus=c", "task.label_column=cell_type"])
    cfg.train.run_name = "other"
    with pytest.raises(ValueError, match=r"train.epochs=0 must be at least 1"):
        cfg.train.epochs = 0


def test_the_ray_boundary_round_trip_keeps_every_value(tmp_path):
    overrides = ["data.corpus=corpora/x", "optim.betas=[0.8, 0.9]", "accelerator.env={HCCL_BUFFSIZE: 200}",
                 "accelerator.worker_resources={FAKE_NPU: 1}", f"train.storage_path={tmp_path}"]
    cfg = load_config(PretrainConfig, None, overrides)
    plain = cfg.to_dict()
    yaml.safe_dump(plain)  # plain values only: the best-config YAML of a study is written from this
    assert plain["optim"]["betas"] == [0.8, 0.9] and plain["accelerator"]["env"] == {"HCCL_BUFFSIZE": "200"}
    assert plain["data"]["corpus"] == str(Path("corpora/x").absolute())  # relative to where the command ran
    assert PretrainConfig.from_dict(plain) == cfg
    assert AcceleratorConfig.from_dict({"type": "cpu"}).type == "cpu"


def test_an_override_into_a_mapping_field_takes_the_rest_of_the_key():
    study = load_config(StudyFile, None, ["study.finetune=f.yaml", "space.optim.lr={loguniform: [1.0e-5, 1.0e-3]}",
                                          "space.train.epochs={choice: [1, 2]}", "space.train.epochs=null"])
    assert study.space == {"optim.lr": {"loguniform": [1e-5, 1e-3]}}


def test_inference_settings_check_their_values():
    base = {"model": "m", "corpus": "c", "out": "o"}
    assert PerturbConfig(**base, perturbation="delete", genes=["CD74"]).states == (None, None)
    with pytest.raises(ValueError, match="--start-state and --goal-state go together"):
        PerturbConfig(**base, perturbation="delete", all_genes=True, start_state="cell_type=B")
    with pytest.raises(ValueError, match="--goal-state 'B': use COLUMN=VALUE"):
        PerturbConfig(**base, perturbation="delete", all_genes=True, start_state="cell_type=B", goal_state="B")
    with pytest.raises(ValueError, match="--actors 0 must be at least 1"):
        PerturbConfig(**base, perturbation="delete", all_genes=True, num_actors=0)
