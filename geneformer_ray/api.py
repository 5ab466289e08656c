"""The Python API: one function per stage. The ``geneformer-ray`` command, the ``jobs/`` scripts and a
notebook all call these, so anything the command line can do a script can do too.

    import geneformer_ray as gr
    corpus = gr.tokenize(adata, "runs/corpus", obs=["cell_type"])                 # an AnnData or .h5ad/.loom paths
    run = gr.pretrain({"data": {"corpus": corpus}, "train": {"max_steps": 200}})  # or a YAML path, or a PretrainConfig
    gr.embed(run.model, corpus, "runs/embed", adata=adata)                         # -> adata.obsm["X_geneformer"]
    stats = gr.perturb(run.model, corpus, "runs/perturb", perturbation="delete", genes=["CD74"]).gene_stats

Each function takes plain Python values (paths, lists, dicts, an AnnData) or the stage's config object,
checks everything it can before Ray starts, joins the Ray cluster it runs in (or starts a local one:
``geneformer_ray.runtime.start_ray``), and returns a result object: where the outputs are, the headline
figures, and small tables in memory.
Bad input raises ``ValueError`` with a message that names the input and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from geneformer_ray.data.convert import convert_hf_dataset
from geneformer_ray.data.corpus import DEFAULT_VAL_FRACTION, read_columns, read_manifest
from geneformer_ray.data.corpus import upgrade_corpus as upgrade_corpus_folder
from geneformer_ray.data.encode import TokenizeOptions
from geneformer_ray.data.tokenize import format_summary
from geneformer_ray.data.tokenize import tokenize as tokenize_files
from geneformer_ray.hpo.config import StudyFile, load_study
from geneformer_ray.hpo.outputs import format_study_summary
from geneformer_ray.hpo.study import tune_study
from geneformer_ray.infer.config import EmbedConfig, InferConfig, PerturbConfig, PredictConfig
from geneformer_ray.infer.embed import OBSM_KEY, add_embeddings
from geneformer_ray.infer.embed import embed as embed_corpus
from geneformer_ray.infer.embed import read_embeddings
from geneformer_ray.infer.perturb import perturb as perturb_corpus
from geneformer_ray.infer.perturb_stats import read_shifts, run_stats
from geneformer_ray.infer.predict import predict as predict_corpus
from geneformer_ray.models.folders import publish_model
from geneformer_ray.runtime import AcceleratorConfig, start_ray
from geneformer_ray.settings import Settings, build, load_config
from geneformer_ray.train.config import FinetuneConfig, PretrainConfig
from geneformer_ray.train.finetune import finetune as finetune_task
from geneformer_ray.train.finetune import format_finetune_summary
from geneformer_ray.train.pretrain import format_pretrain_summary
from geneformer_ray.train.pretrain import pretrain as pretrain_corpus

PathLike = str | os.PathLike
RESOURCES = Path(__file__).parent / "resources"
DEMO_DATA = RESOURCES / "demo"  # PBMC3k (2,638 cells) and Seurat's pbmc_small
QUICKSTART_CONFIG = RESOURCES / "configs" / "pretrain_tiny.yaml"
QUICKSTART_FINETUNE = RESOURCES / "configs" / "finetune_quickstart.yaml"


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """A corpus folder (parquet shards + manifest.json); usable wherever a corpus path is expected."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: PathLike) -> Corpus:
        return cls(Path(path).absolute(), read_manifest(path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def num_cells(self) -> int:
        return self.manifest["num_cells"]

    @property
    def vocab(self) -> str:
        return self.manifest["vocab"]["name"]

    @property
    def columns(self) -> list[str]:
        return list(self.manifest["columns"])

    def cells(self, columns: list[str] | None = None) -> pd.DataFrame:
        """One row per cell: ``cell_id`` and the metadata columns (not the tokens, unless asked for)."""
        columns = columns or [c for c in self.columns if c not in ("input_ids", "counts")]
        return read_columns(self.path, columns).to_pandas()

    def describe(self) -> str:
        """What a person reads after tokenizing: cells kept and dropped, genes mapped, cell lengths."""
        return format_summary(self.manifest) if "files" in self.manifest.get("summary", {}) else \
            f"{self.num_cells:,} cells ({self.vocab}) in {len(self.manifest['shards'])} shard(s): {self.path}"


@dataclass
class TrainResult:
    """A finished pretraining or fine-tuning run."""

    model: Path | None  # Hugging Face model folder (loads in stock transformers); None for a k-fold gene task
    checkpoint: Path | None
    metrics: dict
    run_dir: Path
    tracking_uri: str | None
    mlflow_run_id: str | None
    summary: dict  # everything the run reported
    stage: str = "pretrain"  # pretrain | finetune | quickstart (a pretraining run with its fine-tuning run)
    folds: list[TrainResult] = field(default_factory=list)  # gene classification: one run per fold
    finetuned: TrainResult | None = None  # quickstart: the fine-tuning run of this pretrained model

    def describe(self) -> str:
        """What a person reads at the end of the run (the command line prints it)."""
        if self.stage == "quickstart":
            return format_quickstart_summary(self)
        return format_finetune_summary(self.summary) if self.stage == "finetune" else format_pretrain_summary(self.summary)

    def history(self) -> pd.DataFrame:
        """The run's metrics as logged (one row per logged step), from ``metrics.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        return pd.read_json(path, lines=True) if path.exists() else pd.DataFrame()

    def test_predictions(self) -> pd.DataFrame:
        """Fine-tuning: the test split's predictions (id, true, predicted, one probability per class)."""
        parts = sorted((self.run_dir / "evaluation").glob("test*predictions.parquet"))
        if not parts:
            raise ValueError(f"{self.run_dir} holds no test predictions; they are written by fine-tuning runs")
        return pd.concat([pq.read_table(p).to_pandas().assign(file=p.name) for p in parts], ignore_index=True)

    @classmethod
    def from_summary(cls, summary: dict, run_dir: Path, stage: str = "pretrain") -> TrainResult:
        folds = [cls.from_summary(f, Path(f["evaluation"]).parent, stage) for f in summary.get("folds", [])]
        metrics = summary.get("metrics") or {k: v for k, v in summary.items() if k.startswith("test_")}
        return cls(model=Path(summary["model"]) if summary.get("model") else None,
                   checkpoint=Path(summary["checkpoint"]) if summary.get("checkpoint") else None, metrics=metrics,
                   run_dir=run_dir, tracking_uri=summary.get("tracking_uri"), mlflow_run_id=summary.get("mlflow_run_id"),
                   summary=summary, stage=stage, folds=folds)


@dataclass
class StudyResult:
    """A finished hyperparameter study."""

    study_dir: Path
    metric: str
    best: dict | None  # the best completed trial's row
    best_config: Path | None  # accepted unchanged by finetune()
    best_model: Path | None
    trials: pd.DataFrame  # one row per trial: status, parameters, metric, epochs spent
    summary: dict

    def describe(self) -> str:
        return format_study_summary(self.summary)


@dataclass
class Predictions:
    """A fine-tuned classifier's predictions over a corpus."""

    out: Path
    kind: str  # cell | gene | multitask
    summary: dict

    def describe(self) -> str:
        s = self.summary
        return (f"{s['rows']:,} {'genes' if self.kind == 'gene' else 'cells'} predicted by {s['actors']} {s['device']} "
                f"actor(s) in {s['seconds']} s: {s['out']}")

    def table(self) -> pd.DataFrame:
        """One row per cell (cell_id, predicted class, one probability per class) or, for gene
        classifiers, per gene."""
        if self.kind == "gene":
            return pd.read_parquet(self.out / "gene_predictions.parquet")
        return pq.read_table(str(self.out / "predictions")).to_pandas()

    def add_to(self, adata: anndata.AnnData, *, cell_id_column: str | None = None, prefix: str = "geneformer_") -> int:
        """Each cell's prediction as ``adata.obs`` columns (``geneformer_predicted``, ``geneformer_prob_<class>``;
        multitask: per head), in ``adata``'s cell order, missing for cells the corpus does not hold.
        Returns the number of cells matched."""
        if self.kind == "gene":
            raise ValueError("gene classifiers predict genes, not cells: read predictions.table() instead")
        table = self.table().set_index("cell_id")
        names = adata.obs[cell_id_column].astype(str) if cell_id_column else adata.obs_names.astype(str)
        matched = table.reindex(names)
        for column in table.columns:
            adata.obs[prefix + column] = matched[column].to_numpy()
        return int(names.isin(table.index).sum())


@dataclass
class Embeddings:
    """Cell or gene embeddings in an output folder."""

    out: Path
    mode: str  # mean | cls | gene
    summary: dict

    @property
    def plots(self) -> list[Path]:
        return [Path(p) for p in self.summary.get("plots", [])]

    def describe(self) -> str:
        s = self.summary
        what = f"{s['genes']:,} genes" if self.mode == "gene" else f"{s['cells']:,} cells"
        lines = [f"{what} embedded ({self.mode}, layer {s['layer']}) by {s['actors']} {s['device']} actor(s) in "
                 f"{s['seconds']} s: {s['out']}"]
        return "\n".join(lines + [f"  {path}" for path in [s.get("h5ad"), *s.get("plots", [])] if path])

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Cells in cell-id order with their metadata; the (cells, hidden) matrix is ``.attrs["embedding"]``."""
        self._cells_only()
        return read_embeddings(self.out / "embeddings", columns=columns)

    def matrix(self) -> np.ndarray:
        return self.frame(["cell_id"]).attrs["embedding"]

    def genes(self) -> pd.DataFrame:
        """Gene mode: one row per gene (gene, symbol, cells, mean and median embedding)."""
        if self.mode != "gene":
            raise ValueError(f"mode={self.mode!r} embeds cells; embed with mode='gene' for gene embeddings")
        return pd.read_parquet(self.out / "gene_embeddings.parquet")

    def to_anndata(self) -> anndata.AnnData:
        """A new AnnData: the embeddings as ``X`` and ``obsm["X_geneformer"]``, the corpus metadata as ``obs``."""
        frame = self.frame()
        obs = frame.set_index(frame["cell_id"].astype(str)).drop(columns="cell_id")
        matrix = frame.attrs["embedding"]
        return anndata.AnnData(X=matrix, obs=obs, obsm={OBSM_KEY: matrix}, uns={"geneformer": {"params": self._params()}})

    def add_to(self, adata: anndata.AnnData, *, cell_id_column: str | None = None, key: str = OBSM_KEY) -> int:
        """``adata.obsm[key]`` in ``adata``'s cell order (NaN rows for cells the corpus does not hold) and the
        parameters in ``adata.uns["geneformer"]["params"]``; returns the number of cells matched."""
        return add_embeddings(adata, self.frame(["cell_id"]), cell_id_column=cell_id_column, key=key, params=self._params())

    def _params(self) -> dict:
        return {k: ("" if v is None else v) for k, v in self.summary.items()
                if k in ("model", "corpus", "layer", "mode", "vocab", "num_layers", "max_cells", "seed")}

    def _cells_only(self) -> None:
        if self.mode == "gene":
            raise ValueError("mode='gene' embeds genes: read genes() instead")


@dataclass
class Perturbation:
    """An in-silico perturbation run: per-gene statistics in memory, per-cell shifts on disk."""

    out: Path
    gene_stats: pd.DataFrame  # one row per perturbed gene: cells, mean shift, null, p-value, FDR
    summary: dict

    def describe(self) -> str:
        s = self.summary
        lines = [f"{s['perturbations']:,} perturbations of {s['cells']:,} cells ({s['cells_resumed']:,} done before), "
                 f"{s['genes_tested']:,} genes tested on {s['metric']}, {s['genes_fdr_below_0.05']:,} with FDR < 0.05, "
                 f"{s['seconds']} s"]
        if s.get("genes_not_in_any_cell"):
            lines.append(f"in none of the cells: {', '.join(s['genes_not_in_any_cell'])}")
        lines += [f"  {s['out']}/{name}" for name in [*s["tables"], "shift_vs_significance.png"]]
        return "\n".join(lines)

    def stats(self, mode: str, **options) -> pd.DataFrame:
        """Another statistics mode on this run (``vs_random``, ``goal_state_shift``, ``vs_null`` with
        ``null_run=``, ``mixture_model``, ``aggregate_data`` with ``genes=``, ``aggregate_gene_shifts``)."""
        return run_stats(self.out, mode, **options)

    def shifts(self) -> pd.DataFrame:
        """One row per cell and perturbed gene (and null gene): the embedding shifts the statistics test."""
        return read_shifts(self.out / "shifts")


# -- the stages --------------------------------------------------------------------------------------
def tokenize(data, out: PathLike, *, vocab: str = "gc30M", obs: list[str] | dict[str, str] | None = None,
             count_column: str = "n_counts", filter_column: str = "filter_pass", gene_id_column: str | None = None,
             cell_id_column: str | None = None, layer: str | None = None, keep_counts: bool = False,
             allow_non_integer: bool = False, sum_duplicates: bool = True, min_mapped_fraction: float = 0.5,
             val_fraction: float = DEFAULT_VAL_FRACTION, max_genes: int | None = None, cells_per_shard: int = 10_000,
             executor: str = "auto", overwrite: bool = False, progress: bool = True) -> Corpus:
    """Raw counts -> a corpus folder: rank value encoding of every cell, one Ray task per shard.

    ``data``: an ``anndata.AnnData``, an .h5ad/.loom path, a folder or glob of them, or a list mixing these.
    ``obs``: metadata columns to carry (a list, or {column: new name}); None carries every obs column.
    ``val_fraction``: the cells pretraining holds out (by a hash of the cell id), recorded in the corpus.
    ``max_genes``: keep each cell's top-ranked genes up to this many (default: the model input size).
    ``executor``: ``ray`` (one task per shard), ``local`` (this process) or ``auto`` (local for one shard's
    worth of cells, when starting Ray would take longer than the work).
    """
    columns = None if obs is None else dict(obs) if isinstance(obs, dict) else {c: c for c in obs}
    options = TokenizeOptions(count_column=count_column, filter_column=filter_column, obs_columns=columns,
                              gene_id_column=gene_id_column, cell_id_column=cell_id_column, layer=layer,
                              keep_counts=keep_counts, allow_non_integer=allow_non_integer, sum_duplicates=sum_duplicates,
                              min_mapped_fraction=min_mapped_fraction, val_fraction=val_fraction, max_genes=max_genes)
    tokenize_files(data, out, vocab=vocab, options=options, cells_per_shard=cells_per_shard, executor=executor,
                   overwrite=overwrite, progress=progress)
    return Corpus.open(out)


def convert(dataset: PathLike, out: PathLike, *, vocab: str | None = None, cells_per_shard: int = 50_000,
            val_fraction: float = DEFAULT_VAL_FRACTION, overwrite: bool = False, progress: bool = True) -> Corpus:
    """A Geneformer tokenized dataset (``save_to_disk`` folder, e.g. Genecorpus-30M) -> a corpus folder, streamed."""
    convert_hf_dataset(os.fspath(dataset), out, vocab=vocab, overwrite=overwrite, cells_per_shard=cells_per_shard,
                       val_fraction=val_fraction, progress=progress)
    return Corpus.open(out)


def upgrade_corpus(corpus: PathLike, *, val_fraction: float = DEFAULT_VAL_FRACTION, progress: bool = True) -> Corpus:
    """Record the pretraining split of a corpus written before it was recorded (format 1), in place."""
    upgrade_corpus_folder(os.fspath(corpus), val_fraction=val_fraction, progress=progress)
    return Corpus.open(corpus)


def pretrain(config: PretrainConfig | dict | PathLike | None = None, *, overrides: list[str] = ()) -> TrainResult:
    """Masked gene pretraining on Ray Train. ``config``: a ``PretrainConfig``, a dict of sections, or a
    YAML path; ``overrides``: ``section.key=value`` strings applied on top."""
    cfg = _config(PretrainConfig, config, overrides)
    summary = pretrain_corpus(cfg)
    return TrainResult.from_summary(summary, cfg.run_dir())


def finetune(config: FinetuneConfig | dict | PathLike | None = None, *, overrides: list[str] = (),
             task: str | None = None) -> TrainResult:
    """Fine-tuning for cell, gene (k-fold by gene) or multitask classification. ``task`` overrides ``task.kind``."""
    cfg = _config(FinetuneConfig, config, [*([f"task.kind={task}"] if task else []), *overrides])
    summary = finetune_task(cfg)
    return TrainResult.from_summary(summary, cfg.run_dir(), stage="finetune")


def tune(config: PathLike, *, overrides: list[str] = (), resume: bool = False) -> StudyResult:
    """A hyperparameter study over a fine-tuning config: Ray Tune + Optuna TPE + ASHA, tracked in MLflow."""
    study, base = load_study(os.fspath(config), list(overrides))
    return run_study(study, base, resume=resume)


def load_run_config(stage: str, config, *, overrides: list[str] = (), task: str | None = None):
    """The config ``pretrain`` or ``finetune`` runs with (``task`` as for ``finetune``), or for ``tune`` the
    (study, fine-tuning config) pair ``run_study`` takes: where the command line finds the run folder to
    keep its console log in, before the run starts. Bad values raise ``ValueError``, as the stages do."""
    if stage == "tune":
        return load_study(os.fspath(config), list(overrides))
    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[stage]
    return _config(cls, config, [*([f"task.kind={task}"] if task else []), *overrides])


def run_study(study: StudyFile, base: FinetuneConfig, *, resume: bool = False) -> StudyResult:
    """``tune`` for a study already loaded (``geneformer_ray.hpo.config.load_study``)."""
    summary = tune_study(study, base, resume=resume)
    return StudyResult(study_dir=Path(summary["study_dir"]), metric=summary["metric"], best=summary.get("best"),
                       best_config=Path(summary["best_config"]) if summary.get("best_config") else None,
                       best_model=Path(summary["best_model"]) if summary.get("best_model") else None,
                       trials=pd.DataFrame(summary["trials"]), summary=summary)


QUICKSTART_VAL_FRACTION = 0.05  # 115 of PBMC3k's cells held out from pretraining (by the crc32 of the cell id)
QUICKSTART_MAX_GENES = 256  # each cell's top-ranked genes: a quarter of PBMC3k's mean length, 3 minutes on 2 cores


def quickstart(out: PathLike = "runs/quickstart", *, steps: int | None = None, finetune_epochs: int | None = None,
               overrides: list[str] = (), overwrite: bool = False, progress: bool = True) -> TrainResult:
    """The main job on the bundled demo data, on one Ray instance: tokenize PBMC3k (each cell's top 256
    genes, kept in ``out/corpus`` for later runs), pretrain the ``tiny`` flavour on 2 CPU workers and
    publish it at ``out/model``, then fine-tune it on the cell types with the logistic-regression
    baseline on the same split. ``steps`` / ``finetune_epochs`` override the configs' (200 steps, 8
    epochs); ``overrides`` apply to pretraining. Returns the pretraining run, with the fine-tuning run as
    ``.finetuned``; its ``describe()`` is the quickstart's summary block."""
    start_ray()  # one Ray instance for every stage
    out = Path(out).absolute()
    corpus = out / "corpus"
    if not (corpus / "manifest.json").exists() or overwrite or \
            read_manifest(corpus).get("settings", {}).get("max_genes") != QUICKSTART_MAX_GENES:
        tokenize(DEMO_DATA / "pbmc3k_counts.h5ad", corpus, overwrite=True, val_fraction=QUICKSTART_VAL_FRACTION,
                 max_genes=QUICKSTART_MAX_GENES, progress=progress)
    run = pretrain(QUICKSTART_CONFIG, overrides=[f"data.corpus={corpus}", f"train.storage_path={out}",
                                                 *([f"train.max_steps={steps}"] if steps else []), *overrides])
    run.model = publish_model(run.model, out / "model")
    tuned = finetune(QUICKSTART_FINETUNE, overrides=[f"data.corpus={corpus}", f"model.init_from={run.model}",
                                                     f"train.storage_path={out}",
                                                     *([f"train.epochs={finetune_epochs}"] if finetune_epochs else [])])
    run.finetuned, run.stage = tuned, "quickstart"
    return run


def format_quickstart_summary(run: TrainResult) -> str:
    """The quickstart's one summary block: what was learned, against what gene frequencies and a linear model reach."""
    corpus, tuned = Path(run.summary["corpus"]), run.finetuned
    m, floors = run.summary["metrics"], run.summary.get("floors", {})
    f1 = tuned.summary["metrics"].get("test_macro_f1", float("nan"))
    base = (tuned.summary.get("baseline") or {}).get("cell_type", {})
    lines = [f"corpus: {corpus} ({read_manifest(corpus)['num_cells']:,} PBMC3k cells, top {QUICKSTART_MAX_GENES} genes each)",
             f"pretraining: {m.get('step')} steps, validation loss {m.get('val_loss', float('nan')):.3f} nats per masked gene"]
    if "unigram" in floors and m.get("val_loss") is not None:
        lines.append(f"  gene frequencies alone reach {floors['unigram']:.3f}, by rank {floors['rank']:.3f}: the model is "
                     f"{floors['unigram'] - m['val_loss']:.2f} and {floors['rank'] - m['val_loss']:.2f} nats under them, "
                     "what only the cell's other genes can tell it")
    baselines = [f"{base['macro_f1']:.3f} on all genes' counts"] if base else []
    if "same_genes_macro_f1" in base:
        baselines.append(f"{base['same_genes_macro_f1']:.3f} on the {QUICKSTART_MAX_GENES} genes the model reads")
    lines.append(f"fine-tuned on cell types: test macro-F1 {f1:.3f}"
                 + (f" (logistic regression on the same split: {', '.join(baselines)})" if baselines else ""))
    lines += [f"model: {run.model}", f"cell-type classifier: {tuned.model}",
              f"loss curve: {run.summary['loss_curve']}", f"MLflow: {run.summary['tracking_uri']}"]
    return "\n".join(lines)


def predict(model: PathLike | PredictConfig, corpus: PathLike | None = None, out: PathLike | None = None, *,
            adata: anndata.AnnData | None = None, **options) -> Predictions:
    """A fine-tuned classifier over every cell of a corpus, on a pool of model actors. With ``adata``, the
    predictions also land in ``adata.obs`` (``Predictions.add_to``). ``options``: the fields of ``PredictConfig``
    (batch_size, num_actors, accelerator, overwrite)."""
    cfg = _infer_config(PredictConfig, model, corpus, out, options)
    summary = predict_corpus(cfg)
    result = Predictions(out=Path(summary["out"]), kind=summary["kind"], summary=summary)
    if adata is not None:
        result.add_to(adata, cell_id_column=_cell_id_column(cfg.corpus))
    return result


def embed(model: PathLike | EmbedConfig, corpus: PathLike | None = None, out: PathLike | None = None, *,
          adata: anndata.AnnData | None = None, **options) -> Embeddings:
    """Cell (mean or <cls>) or gene embeddings at one layer, on a pool of model actors, with UMAP / heatmap
    plots. With ``adata``, the cell embeddings also land in ``adata.obsm["X_geneformer"]``. ``options``: the
    fields of ``EmbedConfig`` (layer, mode, batch_size, num_actors, accelerator, max_cells, seed, h5ad,
    adata_path, color, heatmap_by, tracking_uri, experiment, overwrite)."""
    cfg = _infer_config(EmbedConfig, model, corpus, out, options)
    summary = embed_corpus(cfg)
    result = Embeddings(out=Path(summary["out"]), mode=cfg.mode, summary=summary)
    if adata is not None:
        result.add_to(adata, cell_id_column=_cell_id_column(cfg.corpus))
    return result


def perturb(model: PathLike | PerturbConfig, corpus: PathLike | None = None, out: PathLike | None = None,
            **options) -> Perturbation:
    """In-silico deletion, over-expression, inhibition or activation of genes (each alone, a set together,
    every gene of each cell, pairs with an anchor), measured by Geneformer's definitions (or ours), with
    per-gene statistics; resumable in ``out``. ``options``: the fields of ``PerturbConfig`` (perturbation,
    genes, all_genes, group, anchor, emb_mode, start_state, goal_state, alt_states, filters, cell_range,
    layer, max_cells, null_genes, seed, ...)."""
    cfg = _infer_config(PerturbConfig, model, corpus, out, options)
    summary = perturb_corpus(cfg)
    out_dir = Path(summary["out"])
    return Perturbation(out=out_dir, gene_stats=pd.read_csv(out_dir / "gene_stats.csv"), summary=summary)


def perturb_stats(run: PathLike, mode: str, *, null_run: PathLike | None = None, genes: list[str] | None = None,
                  metric: str | None = None) -> pd.DataFrame:
    """A statistics mode of Geneformer's InSilicoPerturberStats on a finished perturbation folder."""
    return run_stats(run, mode, null_run=null_run, genes=genes, metric=metric)


# -- plain values -> configs -----------------------------------------------------------------------
def _config(cls: type[Settings], config, overrides) -> Settings:
    """A run's config from a config object, a dict of sections or a YAML path, plus ``section.key=value`` overrides."""
    if isinstance(config, (str, os.PathLike)):
        return load_config(cls, os.fspath(config), list(overrides))
    values = config.to_dict() if isinstance(config, cls) else _plain(config or {})
    return load_config(cls, None, list(overrides), values=values)


def _infer_config(cls: type[InferConfig], model, corpus, out, options: dict) -> InferConfig:
    if isinstance(model, cls):
        return build(cls, {**model.to_dict(), **_plain(options)}) if options else model
    if corpus is None or out is None:
        raise ValueError(f"pass a model folder, a corpus and an output folder, or one {cls.__name__}")
    accelerator = options.pop("accelerator", None)
    if isinstance(accelerator, str):
        accelerator = AcceleratorConfig(type=accelerator)
    values = {"model": model, "corpus": corpus, "out": out, **options,
              **({"accelerator": accelerator} if accelerator is not None else {})}
    return build(cls, _plain(values))


def _plain(value):
    """Plain YAML-like values: paths (and Corpus results) as strings, configs as dicts, tuples as lists."""
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _cell_id_column(corpus: PathLike) -> str | None:
    """The obs column the corpus took its cell ids from (None: the obs names)."""
    return read_manifest(corpus).get("settings", {}).get("cell_id_column")


__all__ = ["Corpus", "Embeddings", "Perturbation", "Predictions", "StudyResult", "TrainResult", "convert", "embed",
           "finetune", "load_run_config", "perturb", "perturb_stats", "predict", "pretrain", "quickstart", "run_study",
           "tokenize", "tune", "upgrade_corpus"]
