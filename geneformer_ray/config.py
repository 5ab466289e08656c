"""Typed configs from YAML plus ``--set section.key=value`` overrides.

    cfg = load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml", ["train.max_steps=50"])
    worker_cfg = PretrainConfig.from_dict(cfg.to_dict())     # what crosses the Ray boundary

Validation runs on the driver when the config is built, before any worker starts; messages name
the field and the fix. Unknown keys are errors (a typo would otherwise silently do nothing).
"""

from __future__ import annotations

import dataclasses
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

    def validate(self):
        if not self.corpus:
            raise ValueError("data.corpus is empty; set it to a corpus folder (geneformer-ray tokenize ... --out DIR)")
        if (self.batch_size is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of data.batch_size and data.max_tokens (the other to null)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"data.mlm_probability={self.mlm_probability} must be in (0, 1)")


@dataclass
class ModelConfig:
    flavour: str = "tiny"  # see geneformer_ray.models.FLAVOURS
    init_from: str | None = None  # checkpoint folder to start from (ours or a published Geneformer one)

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

    def validate(self):
        for name in ("num_workers", "epochs", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be at least 1 (or null for whole epochs)")


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; default sqlite:///<storage_path>/mlflow.db; http://head:5000 for a server
    experiment: str = "geneformer-pretrain"
    register_as: str | None = None  # registered model name for the final model
    artifact_location: str | None = None  # new experiments' artifact root; default <storage_path>/mlartifacts for sqlite


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "PretrainConfig":
        for section in (self.data, self.model, self.optim, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        return _build(cls, values, "")

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.train.storage_path).absolute() / 'mlflow.db'}"

    def artifact_location(self) -> str | None:
        """Explicit, or beside the sqlite store: MLflow's default is relative to each worker's cwd."""
        if self.tracking.artifact_location or self.tracking.uri:
            return self.tracking.artifact_location
        return (Path(self.train.storage_path).absolute() / "mlartifacts").as_uri()


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
        target = values
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        target[leaf] = yaml.safe_load(raw)
    return _build(cls, values, "").validate()


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
        return {str(k): str(v) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
