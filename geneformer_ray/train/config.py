"""Settings of the training stage: pretraining (``PretrainConfig``) and fine-tuning (``FinetuneConfig``).

    cfg = load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml", ["train.max_steps=50"])
    cfg = FinetuneConfig(data={"corpus": "corpus/"}, task={"kind": "cell", "label_column": "cell_type"})

Every section checks itself when built or assigned (``geneformer_ray.settings``); paths become absolute.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from geneformer_ray.models.flavours import FLAVOURS
from geneformer_ray.models.packing import ON_OFF, on_off
from geneformer_ray.runtime import AcceleratorConfig, check_placement
from geneformer_ray.settings import AbsolutePath, Settings
from geneformer_ray.tracking import TrackingConfig, artifact_location, tracking_uri

TASK_KINDS = ("cell", "gene", "multitask")


def _check_pad_multiple(value: int | None) -> None:
    if value is not None and not 1 <= value <= 1024:
        raise ValueError(f"data.pad_to_multiple={value} must be between 1 and 1024 (or null for the accelerator's default)")


def _check_corpus(corpus: str) -> None:
    if not corpus:
        raise ValueError("data.corpus is empty; set it to a corpus folder (geneformer-ray tokenize ... --out DIR)")


def _check_model(flavour: str, init_from: str | None, hint: str = "") -> None:
    if init_from is None and flavour not in FLAVOURS:
        raise ValueError(f"model.flavour={flavour!r} is unknown; choose one of {', '.join(FLAVOURS)}")
    if init_from is not None and not (Path(init_from) / "config.json").exists():
        raise ValueError(f"model.init_from={init_from!r} is not a model folder (no config.json){hint}")




# -- pretraining ------------------------------------------------------------------------------------
class DataConfig(Settings):
    corpus: AbsolutePath = ""  # corpus folder written by `geneformer-ray tokenize` / `convert-dataset`
    batch_size: int | None = 12  # cells per device per step (Geneformer: 12); or use max_tokens
    max_tokens: int | None = None  # token-budget batches instead of a fixed batch size
    window_batches: int = 64  # length grouping: batches sorted together
    shuffle_buffer: int = 4096  # rows in the local shuffle buffer of each worker
    val_fraction: float | None = None  # must match the corpus's recorded split (tokenize --val-fraction); null: the corpus's
    mlm_probability: float = 0.15
    pad_to_multiple: int | None = None  # batch width rounded up to this; default 64 on CUDA/NPU, 1 on CPU
    packing: str = "auto"  # on | off | auto: cells end to end in one row, attention within each (models.packing)

    _packing_words = field_validator("packing", mode="before")(classmethod(lambda cls, value: on_off(value)))

    @model_validator(mode="after")
    def _check(self):
        _check_corpus(self.corpus)
        if self.packing not in ON_OFF:
            raise ValueError(f"data.packing={self.packing!r}: use {', '.join(ON_OFF)}")
        if (self.batch_size is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of data.batch_size and data.max_tokens (the other to null)")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"data.mlm_probability={self.mlm_probability} must be in (0, 1)")
        _check_pad_multiple(self.pad_to_multiple)
        return self


class ModelConfig(Settings):
    flavour: str = "tiny"  # see geneformer_ray.models.flavours.FLAVOURS
    init_from: AbsolutePath | None = None  # checkpoint folder to start from (ours or a published Geneformer one)
    sparse_attention_dropout: bool = True  # CPU training: same dropout law, ~5x cheaper (geneformer_ray.models.attention)
    activation_checkpointing: bool = False  # keep only each layer's input, recompute the rest in backward (~1/3 more compute)
    # the prediction head's bias at the start: zero (BERT's) or gene_frequency, the log-frequency of each gene in
    # the corpus's training cells, so that the loss starts at the unigram floor and steps go to context from there
    output_bias: str = "zero"

    @model_validator(mode="after")
    def _check(self):
        _check_model(self.flavour, self.init_from)
        if self.output_bias not in ("zero", "gene_frequency"):
            raise ValueError(f"model.output_bias={self.output_bias!r}: use zero or gene_frequency")
        if self.output_bias != "zero" and self.init_from:
            raise ValueError("model.output_bias=gene_frequency sets up a new model's prediction head; a run from "
                             "model.init_from keeps the head it loads: set model.output_bias=zero")
        return self


class OptimConfig(Settings):
    lr: float = 1e-3
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_steps: int = 10_000
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    fused: str = "auto"  # on | off | auto: one fused AdamW kernel (CUDA/CPU: torch's fused=True; NPU: NpuFusedAdamW); auto = on

    _fused_words = field_validator("fused", mode="before")(classmethod(lambda cls, value: on_off(value)))

    @model_validator(mode="after")
    def _check(self):
        if self.fused not in ON_OFF:
            raise ValueError(f"optim.fused={self.fused!r}: use {', '.join(ON_OFF)}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}: use linear, cosine or constant")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError("optim.lr must be > 0, optim.warmup_steps >= 0, optim.grad_accum_steps >= 1")
        return self


class TrainConfig(Settings):
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
    storage_path: AbsolutePath = "runs"  # multi-node: shared storage (NFS or S3-compatible) visible to every node
    placement_strategy: str = "PACK"  # PACK fills a node first; SPREAD puts workers on different nodes
    cell_log: AbsolutePath | None = None  # folder: the corpus cell numbers of every step, per rank (an audit)

    @model_validator(mode="after")
    def _check(self):
        for name in ("num_workers", "epochs", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        check_placement(self.placement_strategy)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be at least 1 (or null for whole epochs)")
        return self


class RunSettings(Settings):
    """A training run's config: its tracking defaults sit beside the run's storage."""

    def tracking_uri(self) -> str | None:
        return tracking_uri(self.tracking, self.train.storage_path)

    def artifact_location(self) -> str | None:
        return artifact_location(self.tracking, self.train.storage_path)

    def run_dir(self, run_name: str | None = None) -> Path:
        """The run's own folder under the storage path (plots, metrics.jsonl, evaluation)."""
        return Path(self.train.storage_path).absolute() / (run_name or self.train.run_name)


class PretrainConfig(RunSettings):
    data: DataConfig = Field(default_factory=lambda: DataConfig.model_construct())
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    accelerator: AcceleratorConfig = Field(default_factory=AcceleratorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# -- fine-tuning ------------------------------------------------------------------------------------
class FinetuneDataConfig(Settings):
    corpus: AbsolutePath = ""  # corpus folder with the label / group columns carried from obs
    batch_size: int = 12  # cells per device per step
    window_batches: int = 16  # length grouping window
    shuffle_buffer: int = 2048
    max_cells: int | None = None  # subsample the corpus (seeded) before splitting
    pad_to_multiple: int | None = None  # batch width rounded up to this; default 64 on CUDA/NPU, 1 on CPU
    loader: str = "auto"  # memory: the splits' cells held by every worker | stream: Ray Data | auto: memory up to 20M tokens

    @model_validator(mode="after")
    def _check(self):
        if self.loader not in ("auto", "memory", "stream"):
            raise ValueError(f"data.loader={self.loader!r}: use auto, memory (the splits' cells held in memory by every "
                             "worker) or stream (Ray Data)")
        _check_corpus(self.corpus)
        if self.batch_size < 1 or self.window_batches < 1:
            raise ValueError("data.batch_size and data.window_batches must be at least 1")
        _check_pad_multiple(self.pad_to_multiple)
        return self


class TaskConfig(Settings):
    kind: str = "cell"  # cell | gene | multitask
    label_column: str | None = None  # cell: the class column
    label_columns: list[str] = Field(default_factory=list)  # multitask: one head per column (one: a mean-pooled cell classifier)
    loss_weights: dict[str, float] = Field(default_factory=dict)  # multitask: per column (default 1)
    derived_columns: dict[str, dict[str, str]] = Field(default_factory=dict)  # {new: {source: COL, VALUE: LABEL, ...}}
    min_class_size: int = 10  # classes with fewer cells (genes) are dropped and reported
    class_weights: str = "none"  # none | balanced (inverse class frequency in the loss)
    gene_classes: AbsolutePath | None = None  # gene: CSV/TSV of Ensembl IDs, one column per class (or long with gene_label_column)
    gene_label_column: str | None = None  # gene: long format, the column holding each gene's class
    num_folds: int = 5  # gene: k-fold cross-validation split by gene
    max_folds: int | None = None  # gene: run only the first folds (quick looks)
    baseline: bool = False  # cell / multitask: also fit logistic regression on log-normalised counts, same split

    @model_validator(mode="after")
    def _check(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task.kind={self.kind!r}: use cell, gene or multitask")
        if self.kind == "cell" and not self.label_column:
            raise ValueError("task.kind=cell needs task.label_column (the obs column carried into the corpus)")
        if self.kind == "multitask" and not self.label_columns:
            raise ValueError("task.kind=multitask needs task.label_columns (one head per column on the mean of the "
                             "cell's token states; one column makes a mean-pooled cell classifier)")
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
        return self


class SplitConfig(Settings):
    method: str = "stratified"  # stratified | group | ids
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    group_column: str | None = None  # group: no value (donor, patient) in two splits
    ids: dict[str, AbsolutePath] = Field(default_factory=dict)  # ids: {train: FILE, val: FILE, test: FILE}, one cell id per line
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.method not in ("stratified", "group", "ids"):
            raise ValueError(f"split.method={self.method!r}: use stratified, group or ids")
        if self.method == "group" and not self.group_column:
            raise ValueError("split.method=group needs split.group_column (e.g. donor)")
        if self.method == "ids" and not self.ids:
            raise ValueError("split.method=ids needs split.ids: {train: FILE, val: FILE, test: FILE}")
        return self


class FinetuneModelConfig(Settings):
    init_from: AbsolutePath | None = None  # pretrained folder (ours or a published Geneformer one); None = from scratch
    flavour: str = "tiny"  # from scratch only
    freeze_layers: int = 0  # freeze the embeddings and the first N encoder layers
    freeze_embeddings: bool = False  # freeze the gene and position embeddings alone (implied by freeze_layers > 0)
    lora_rank: int = 0  # > 0: LoRA adapters (peft) instead of full fine-tuning, merged back when saved
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    hidden_dropout: float | None = None  # override the checkpoint's dropout
    attention_dropout: float | None = None
    sparse_attention_dropout: bool = True  # CPU training: same dropout law, cheaper (geneformer_ray.models.attention)
    activation_checkpointing: bool = False  # keep only each layer's input, recompute the rest in backward

    @model_validator(mode="after")
    def _check(self):
        _check_model(self.flavour, self.init_from, "; pass a folder saved by geneformer-ray (…/model) or a Geneformer checkpoint")
        if self.freeze_layers < 0 or self.lora_rank < 0:
            raise ValueError("model.freeze_layers and model.lora_rank must be >= 0")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"model.{name}={value} must be in [0, 1)")
        return self


class FinetuneTrainConfig(Settings):
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
    storage_path: AbsolutePath = "runs"  # multi-node: shared storage
    placement_strategy: str = "PACK"  # or SPREAD: workers on different nodes

    @model_validator(mode="after")
    def _check(self):
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
        return self


class FinetuneConfig(RunSettings):
    data: FinetuneDataConfig = Field(default_factory=lambda: FinetuneDataConfig.model_construct())
    task: TaskConfig = Field(default_factory=lambda: TaskConfig.model_construct())
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: FinetuneModelConfig = Field(default_factory=FinetuneModelConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.001, warmup_steps=50))
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig)
    accelerator: AcceleratorConfig = Field(default_factory=AcceleratorConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="geneformer-finetune"))
