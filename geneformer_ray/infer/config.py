"""Settings of the inference stage: what ``predict``, ``embed`` and ``perturb`` are asked to do.

    cfg = EmbedConfig(model="runs/quickstart/model", corpus="runs/quickstart/corpus", out="runs/embed", color=["cell_type"])
    cfg = PerturbConfig(model=..., corpus=..., out=..., perturbation="delete", genes=["CD74"])

Checks that need only the values run here, when the config is built; checks against the model folder
and the corpus (vocabulary, layers, columns) run in each stage before any actor starts.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.settings import AbsolutePath, Settings

EMBED_MODES = ("mean", "cls", "gene")
PERTURBATIONS = ("delete", "overexpress")


class InferConfig(Settings):
    """A model, a corpus, an output folder and the pool of model actors that reads one with the other."""

    model: AbsolutePath  # a model folder (ours or a published Geneformer checkpoint)
    corpus: AbsolutePath  # a corpus folder in the model's vocabulary
    out: AbsolutePath  # the output folder (appears complete, or not at all)
    batch_size: int = 32  # sequences per forward pass
    num_actors: int | None = None  # model actors; default one per NPU / GPU, or CPUs - 1
    accelerator: AcceleratorConfig = Field(default_factory=AcceleratorConfig)
    overwrite: bool = False  # replace a non-empty output folder

    @model_validator(mode="after")
    def _check_pool(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be at least 1")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--actors {self.num_actors} must be at least 1 (or omitted: one per device)")
        return self


class PredictConfig(InferConfig):
    """Batch inference of a fine-tuned classifier over every cell of the corpus."""


class TrackedInferConfig(InferConfig):
    tracking_uri: str | None = None  # MLflow: parameters, plots and tables logged there (None: no MLflow)
    experiment: str = "geneformer-infer"
    layer: int = -1  # 0 = the last layer, -1 = the second to last (Geneformer's default), ...
    max_cells: int | None = None  # a seeded sample of this many cells (start-state cells for perturbation)
    seed: int = 0

    @model_validator(mode="after")
    def _check_sample(self):
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError(f"--max-cells {self.max_cells} must be at least 1")
        return self


class EmbedConfig(TrackedInferConfig):
    """Cell embeddings (mean of gene states, or <cls>) or gene embeddings, with plots and an .h5ad copy."""

    experiment: str = "geneformer-embed"
    mode: str = "mean"  # mean | cls | gene
    h5ad: bool = False  # also write a copy of the tokenized .h5ad with obsm["X_geneformer"]
    adata_path: AbsolutePath | None = None  # the .h5ad to copy (default: the corpus' single .h5ad source)
    color: list[str] = Field(default_factory=list)  # UMAP plots coloured by these corpus columns
    heatmap_by: str | None = None  # heatmap of embedding dimensions, cells grouped by this column

    @model_validator(mode="after")
    def _check(self):
        if self.mode not in EMBED_MODES:
            raise ValueError(f"--mode {self.mode!r}: use {', '.join(EMBED_MODES)}")
        if self.mode == "gene" and (self.plot_columns or self.h5ad or self.adata_path):
            raise ValueError("--color, --heatmap-by and --h5ad are for cell embeddings; drop them with --mode gene")
        return self

    @property
    def plot_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.color, *([self.heatmap_by] if self.heatmap_by else [])]))


class PerturbConfig(TrackedInferConfig):
    """In-silico deletion or over-expression of genes, measured as the shift of each cell's embedding."""

    experiment: str = "geneformer-perturb"
    perturbation: str  # delete | overexpress
    genes: list[str] = Field(default_factory=list)  # Ensembl IDs or symbols; empty with all_genes
    all_genes: bool = False  # perturb every gene of each cell
    start_state: str | None = None  # COLUMN=VALUE: perturb only these cells ...
    goal_state: str | None = None  # COLUMN=VALUE: ... and measure their shift towards these
    max_state_cells: int = 1_000  # cells averaged into the goal state's embedding
    null_genes: int = 5  # random genes per cell perturbed the same way: the null
    batch_size: int = 64
    cells_per_batch: int = 8  # cells per actor call and part file
    progress: bool = True  # a progress bar in cells

    @model_validator(mode="after")
    def _check(self):
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"--perturbation {self.perturbation!r}: use delete or overexpress")
        if bool(self.genes) == self.all_genes:
            raise ValueError("pass either --genes ID ... or --all-genes (one of the two)")
        if self.null_genes < 1:
            raise ValueError(f"--null-genes {self.null_genes} must be at least 1 (the null the statistics test against)")
        if self.cells_per_batch < 1:
            raise ValueError(f"--cells-per-batch {self.cells_per_batch} must be at least 1")
        start, goal = self.states
        if (start is None) != (goal is None):
            raise ValueError("--start-state and --goal-state go together (cells of the start state are moved towards the goal)")
        return self

    @property
    def states(self) -> tuple[list[str] | None, list[str] | None]:
        """([column, value] of the start state, of the goal state), or (None, None)."""
        return parse_state(self.start_state, "--start-state"), parse_state(self.goal_state, "--goal-state")


def parse_state(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    column, sep, value = text.partition("=")
    if not sep or not column or not value:
        raise ValueError(f"{flag} {text!r}: use COLUMN=VALUE, e.g. {flag} cell_type=B")
    return [column, value]
