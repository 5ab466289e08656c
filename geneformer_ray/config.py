"""Typed configs from YAML plus ``--set section.key=value`` overrides.

    cfg = load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml", ["train.max_steps=50"])
    worker_cfg = PretrainConfig.from_dict(cfg.to_dict())     # what crosses the Ray boundary

Validation runs on the driver when the config is built, before any worker starts; messages name
the field and the fix. Unknown keys are errors (a typo would otherwise silently do nothing).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from geneformer_ray.accelerators import AcceleratorConfig


@dataclass
class DataConfig:
    corpus: str = ""  # corpus folder written by `geneformer-ray tokenize` / `convert-dataset`
    batch_size: int | None = 12  # cells per device per step (Geneformer: 12); or use max_tokens
    max_tokens: int | None = None  # token-budget batches instead of a fixed batch size
    window_batches: int = 64  # length grouping: batches sorted together
    shuffle_buffer: int = 4096  # rows in the local shuffle buffer of each worker
    val_fraction: float = 0.02  # held out by a hash of cell_id (the same cells in every run)
    mlm_probability: float = 0.15
    pad_to_multiple: int | None = None  # batch width rounded up to this; default 64 on CUDA/NPU, 1 on CPU

    def validate(self):
        if not self.corpus:
            raise ValueError("data.corpus is empty; set it to a corpus folder (geneformer-ray tokenize ... --out DIR)")
        if (self.batch_size is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of data.batch_size and data.max_tokens (the other to null)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"data.mlm_probability={self.mlm_probability} must be in (0, 1)")
        _check_pad_multiple(self.pad_to_multiple)


def _check_pad_multiple(value: int | None) -> None:
    if value is not None and not 1 <= value <= 1024:
        raise ValueError(f"data.pad_to_multiple={value} must be between 1 and 1024 (or null for the accelerator's default)")


@dataclass
class ModelConfig:
    flavour: str = "tiny"  # see geneformer_ray.models.FLAVOURS
    init_from: str | None = None  # checkpoint folder to start from (ours or a published Geneformer one)
    sparse_attention_dropout: bool = True  # CPU training: same dropout law, ~5x cheaper (geneformer_ray.attention)

    def validate(self):
        from geneformer_ray.models import FLAVOURS

        if self.init_from is None and self.flavour not in FLAVOURS:
            raise ValueError(f"model.flavour={self.flavour!r} is unknown; choose one of {', '.join(FLAVOURS)}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"model.init_from={self.init_from!r} is not a model folder (no config.json)")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_steps: int = 10_000
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1

    def validate(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}: use linear, cosine or constant")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError("optim.lr must be > 0, optim.warmup_steps >= 0, optim.grad_accum_steps >= 1")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_placement(strategy: str) -> None:
    """Ray's placement-group strategies for the training workers."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"train.placement_strategy={strategy!r}: use one of {', '.join(PLACEMENT_STRATEGIES)} "
                         "(SPREAD: one worker per node where it can)")


@dataclass
class TrainConfig:
    num_workers: int = 2  # one per accelerator
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when reached
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 20
    checkpoint_every: int = 500
    num_checkpoints_to_keep: int = 2
    max_failures: int = 1  # worker failures survived by restarting from the latest checkpoint
    run_name: str = "pretrain"  # re-running with the same name and storage_path resumes
    storage_path: str = "runs"  # multi-node: shared storage (NFS or S3-compatible) visible to every node
    placement_strategy: str = "PACK"  # PACK fills a node first; SPREAD puts workers on different nodes

    def validate(self):
        for name in ("num_workers", "epochs", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        check_placement(self.placement_strategy)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be at least 1 (or null for whole epochs)")


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<storage_path>/mlflow.db;
    #                         "none": no MLflow (metrics still go to <run folder>/metrics.jsonl)
    experiment: str = "geneformer-pretrain"
    register_as: str | None = None  # registered model name for the final model
    artifact_location: str | None = None  # new experiments' artifact root; default <storage_path>/mlartifacts for sqlite


class Sectioned:
    """Shared behaviour of top-level configs made of sections: validation and the Ray boundary."""

    def validate(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        return _build(cls, values, "")


class _Sections(Sectioned):
    """Training configs: sections plus the tracking defaults beside the run's storage."""

    def _given_uri(self) -> str | None:
        """tracking.uri, else the cluster's MLflow server from MLFLOW_TRACKING_URI (cluster/ sets it on every node)."""
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def tracking_uri(self) -> str | None:
        uri = self._given_uri()
        if uri and uri.lower() == "none":
            return None  # MLflow off
        return uri or f"sqlite:///{Path(self.train.storage_path).absolute() / 'mlflow.db'}"

    def artifact_location(self) -> str | None:
        """Explicit, or beside the sqlite store: MLflow's default is relative to each worker's cwd."""
        if self.tracking.artifact_location or self._given_uri():
            return self.tracking.artifact_location  # also None when MLflow is off
        return (Path(self.train.storage_path).absolute() / "mlartifacts").as_uri()


@dataclass
class PretrainConfig(_Sections):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# -- fine-tuning ------------------------------------------------------------------------------------
TASK_KINDS = ("cell", "gene", "multitask")


@dataclass
class FinetuneDataConfig:
    corpus: str = ""  # corpus folder with the label / group columns carried from obs
    batch_size: int = 12  # cells per device per step
    window_batches: int = 16  # length grouping window
    shuffle_buffer: int = 2048
    max_cells: int | None = None  # subsample the corpus (seeded) before splitting
    pad_to_multiple: int | None = None  # batch width rounded up to this; default 64 on CUDA/NPU, 1 on CPU

    def validate(self):
        if not self.corpus:
            raise ValueError("data.corpus is empty; set it to a corpus folder (geneformer-ray tokenize ... --out DIR)")
        if self.batch_size < 1 or self.window_batches < 1:
            raise ValueError("data.batch_size and data.window_batches must be at least 1")
        _check_pad_multiple(self.pad_to_multiple)


@dataclass
class TaskConfig:
    kind: str = "cell"  # cell | gene | multitask
    label_column: str | None = None  # cell: the class column
    label_columns: list[str] = field(default_factory=list)  # multitask: one head per column
    loss_weights: dict[str, float] = field(default_factory=dict)  # multitask: per column (default 1)
    derived_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # {new: {source: COL, VALUE: LABEL, ...}}
    min_class_size: int = 10  # classes with fewer cells (genes) are dropped and reported
    class_weights: str = "none"  # none | balanced (inverse class frequency in the loss)
    gene_classes: str | None = None  # gene: CSV/TSV of Ensembl IDs, one column per class (or long with gene_label_column)
    gene_label_column: str | None = None  # gene: long format, the column holding each gene's class
    num_folds: int = 5  # gene: k-fold cross-validation split by gene
    max_folds: int | None = None  # gene: run only the first folds (quick looks)
    baseline: bool = False  # cell / multitask: also fit logistic regression on log-normalised counts, same split

    def validate(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task.kind={self.kind!r}: use cell, gene or multitask")
        if self.kind == "cell" and not self.label_column:
            raise ValueError("task.kind=cell needs task.label_column (the obs column carried into the corpus)")
        if self.kind == "multitask" and len(self.label_columns) < 2:
            raise ValueError("task.kind=multitask needs task.label_columns with at least two columns")
        if self.kind == "gene" and not self.gene_classes:
            raise ValueError("task.kind=gene needs task.gene_classes (a CSV/TSV of Ensembl IDs per class)")
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"task.class_weights={self.class_weights!r}: use none or balanced")
        for name, mapping in self.derived_columns.items():
            if "source" not in mapping:
                raise ValueError(f"task.derived_columns.{name} needs a 'source' column and VALUE: LABEL pairs "
                                 "(values not listed become 'other')")
        unknown = set(self.loss_weights) - set(self.label_columns)
        if unknown:
            raise ValueError(f"task.loss_weights names {sorted(unknown)}, not in task.label_columns {self.label_columns}")
        if self.min_class_size < 1:
            raise ValueError("task.min_class_size must be at least 1")


@dataclass
class SplitConfig:
    method: str = "stratified"  # stratified | group | ids
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    group_column: str | None = None  # group: no value (donor, patient) in two splits
    ids: dict[str, str] = field(default_factory=dict)  # ids: {train: FILE, val: FILE, test: FILE}, one cell id per line
    seed: int = 0

    def validate(self):
        if self.method not in ("stratified", "group", "ids"):
            raise ValueError(f"split.method={self.method!r}: use stratified, group or ids")
        if self.method == "group" and not self.group_column:
            raise ValueError("split.method=group needs split.group_column (e.g. donor)")
        if self.method == "ids" and not self.ids:
            raise ValueError("split.method=ids needs split.ids: {train: FILE, val: FILE, test: FILE}")


@dataclass
class FinetuneModelConfig:
    init_from: str | None = None  # pretrained folder (ours or a published Geneformer one); None = from scratch
    flavour: str = "tiny"  # from scratch only
    freeze_layers: int = 0  # freeze the embeddings and the first N encoder layers
    lora_rank: int = 0  # > 0: LoRA adapters (peft) instead of full fine-tuning, merged back when saved
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    hidden_dropout: float | None = None  # override the checkpoint's dropout
    attention_dropout: float | None = None
    sparse_attention_dropout: bool = True  # CPU training: same dropout law, cheaper (geneformer_ray.attention)

    def validate(self):
        from geneformer_ray.models import FLAVOURS

        if self.init_from is None and self.flavour not in FLAVOURS:
            raise ValueError(f"model.flavour={self.flavour!r} is unknown; choose one of {', '.join(FLAVOURS)}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"model.init_from={self.init_from!r} is not a model folder (no config.json); "
                             "pass a folder saved by geneformer-ray (…/model) or a Geneformer checkpoint")
        if self.freeze_layers < 0 or self.lora_rank < 0:
            raise ValueError("model.freeze_layers and model.lora_rank must be >= 0")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"model.{name}={value} must be in [0, 1)")


@dataclass
class FinetuneTrainConfig:
    num_workers: int = 2
    epochs: int = 3
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None  # steps between validation runs; None = at the end of every epoch
    evals_per_epoch: int | None = None  # or: this many validation runs per epoch, whatever the batch size (HPO)
    max_failures: int = 1
    num_checkpoints_to_keep: int = 1
    run_name: str = "finetune"  # re-running with the same name and storage_path resumes
    storage_path: str = "runs"  # multi-node: shared storage
    placement_strategy: str = "PACK"  # or SPREAD: workers on different nodes

    def validate(self):
        for name in ("num_workers", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        check_placement(self.placement_strategy)
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"train.eval_every={self.eval_every} must be at least 1 (or null: every epoch)")
        if self.evals_per_epoch is not None and (self.evals_per_epoch < 1 or self.eval_every is not None):
            raise ValueError(f"train.evals_per_epoch={self.evals_per_epoch} must be at least 1, and not set together "
                             f"with train.eval_every={self.eval_every} (one of the two, or neither: every epoch)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be at least 1 (or null for whole epochs)")


def _finetune_optim() -> OptimConfig:
    return OptimConfig(lr=5e-5, weight_decay=0.001, warmup_steps=50, schedule="linear")


def _finetune_tracking() -> TrackingConfig:
    return TrackingConfig(experiment="geneformer-finetune")


@dataclass
class FinetuneConfig(_Sections):
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    tracking: TrackingConfig = field(default_factory=_finetune_tracking)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build ``cls`` from a YAML file and ``section.key=value`` overrides (values parsed as YAML)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: use section.key=value")
        _set_override(values, cls, key.split("."), yaml.safe_load(raw), item)
    return _absolute_paths(_build(cls, values, "")).validate()


def _set_override(values: dict, cls, parts: list[str], value, item: str) -> None:
    """Put one ``--set`` value into the raw config. Once the path reaches a mapping field (``dict[str, ...]``),
    the rest of the key is one entry of it, dots and all (``space.optim.lr``); ``null`` removes that entry."""
    target, hint = values, cls
    for i, part in enumerate(parts[:-1]):
        hint = typing.get_type_hints(hint).get(part) if dataclasses.is_dataclass(hint) else None
        if typing.get_origin(hint) is dict:
            entries = target.get(part) or {}
            target[part] = entries
            entry = ".".join(parts[i + 1:])
            if value is None:
                entries.pop(entry, None)
            else:
                entries[entry] = value
            return
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {item!r}: {part!r} is not a section")
    target[parts[-1]] = value


PATH_FIELDS = ("data.corpus", "model.init_from", "task.gene_classes", "train.storage_path", "split.ids")


def _absolute_paths(cfg):
    """Paths are relative to where the command runs; workers run elsewhere, so make them absolute."""
    for dotted in PATH_FIELDS:
        section_name, name = dotted.split(".")
        section = getattr(cfg, section_name, None)
        value = getattr(section, name, None) if section is not None else None
        if isinstance(value, dict):
            setattr(section, name, {k: _absolute(v) for k, v in value.items()})
        elif value:
            setattr(section, name, _absolute(value))
    return cfg


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().absolute())


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; known in "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        kwargs[name] = _build(hint, value, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else _coerce(hint, value, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError:
        raise
    except TypeError as exc:
        raise ValueError(f"{prefix.rstrip('.')}: {exc}") from None


def _coerce(hint, value, name: str):
    """Check a scalar against its annotation; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ValueError(f"{name} must be a list of {len(typing.get_args(hint))} values, got {value!r}")
        return tuple(_coerce(t, v, name) for t, v in zip(typing.get_args(hint), value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        value_hint = typing.get_args(hint)[1]
        if value_hint is str:  # environment-like mappings: numbers are written as text
            return {str(k): str(v) for k, v in value.items()}
        return {str(k): _coerce(value_hint, v, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(typing.get_args(hint)[0], v, name) for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint is dict and isinstance(value, dict):  # free-form mappings (a search dimension, a trial's params)
        return value
    raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
