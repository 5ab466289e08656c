"""Settings of the inference stage: what ``predict``, ``embed`` and ``perturb`` are asked to do.

    cfg = EmbedConfig(model="runs/quickstart/model", corpus="runs/quickstart/corpus", out="runs/embed", color=["cell_type"])
    cfg = PerturbConfig(model=..., corpus=..., out=..., perturbation="delete", genes=["CD74"])

Checks that need only the values run here, when the config is built; checks against the model folder
and the corpus (vocabulary, layers, columns) run in each stage before any actor starts.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from geneformer_ray.infer.perturb_plan import EMB_MODES as PERTURB_MODES
from geneformer_ray.infer.perturb_plan import KINDS, MEASURES
from geneformer_ray.models.packing import ON_OFF, on_off
from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.settings import AbsolutePath, Settings

EMBED_MODES = ("mean", "cls", "gene")
PERTURBATIONS, PERTURB_EMB_MODES = KINDS, PERTURB_MODES


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
    # auto | on | off: batches' cells end to end in one row, attention within each cell (each stage's ``auto``: where
    # it measured faster, geneformer_ray.models.packing)
    packing: str = "auto"

    _packing_words = field_validator("packing", mode="before")(classmethod(lambda cls, value: on_off(value)))

    @model_validator(mode="after")
    def _check_sample(self):
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError(f"--max-cells {self.max_cells} must be at least 1")
        if self.packing not in ON_OFF:
            raise ValueError(f"--packing {self.packing!r}: use {', '.join(ON_OFF)}")
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
    """In-silico perturbation of genes (Geneformer's analyses, and inhibit / activate), measured as the
    shift of each cell's embedding and, in ``cell_and_gene`` mode, of every other gene's."""

    experiment: str = "geneformer-perturb"
    perturbation: str  # delete | overexpress | inhibit | activate
    genes: list[str] = Field(default_factory=list)  # Ensembl IDs or symbols; empty with all_genes
    all_genes: bool = False  # perturb every gene of each cell
    group: bool = False  # perturb the given genes together (one perturbation), not each alone
    anchor: str | None = None  # the anchor perturbed alone, then with each other gene (Geneformer's combos=1)
    quartiles: int = 1  # inhibit / activate: how far the gene moves, in quarters of the cell's ranking
    emb_mode: str = "cell"  # cell (gene-state mean) | cls (V2) | cell_and_gene / cls_and_gene (also every gene's own shift)
    measure: str = "geneformer"  # the shift the statistics use without states: geneformer | cell-shift
    start_state: str | None = None  # COLUMN=VALUE: perturb only these cells ...
    goal_state: str | None = None  # COLUMN=VALUE: ... and measure their shift towards these
    alt_states: list[str] = Field(default_factory=list)  # COLUMN=VALUE: alternative end states, measured too
    filters: list[str] = Field(default_factory=list)  # COLUMN=VALUE[,VALUE...]: only cells with one of these values
    cell_range: str | None = None  # START:END: the cells at these positions of the selection (corpus order)
    max_state_cells: int = 1_000  # cells averaged into each state's embedding
    null_genes: int = 5  # random genes per cell perturbed the same way: the null
    batch_size: int = 64
    cells_per_batch: int = 8  # cells per actor call and part file
    progress: bool = True  # a progress bar in cells

    @model_validator(mode="after")
    def _check(self):
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"--perturbation {self.perturbation!r}: use {', '.join(PERTURBATIONS)}")
        if self.emb_mode not in PERTURB_EMB_MODES:
            raise ValueError(f"--emb-mode {self.emb_mode!r}: use {', '.join(PERTURB_EMB_MODES)}")
        if self.measure not in MEASURES:
            raise ValueError(f"--measure {self.measure!r}: use {', '.join(MEASURES)}")
        if bool(self.genes) == self.all_genes:
            raise ValueError("pass either --genes ID ... or --all-genes (one of the two)")
        if self.group and (self.all_genes or len(self.genes) < 2):
            raise ValueError("--group perturbs the given --genes together: pass two or more genes, without --all-genes")
        if self.group and self.anchor:
            raise ValueError("--anchor pairs the anchor with each gene alone; it does not combine with --group")
        if not 1 <= self.quartiles <= 3:
            raise ValueError(f"--quartiles {self.quartiles}: inhibit / activate move a gene by 1, 2 or 3 quarters of the ranking")
        if self.null_genes < 1:
            raise ValueError(f"--null-genes {self.null_genes} must be at least 1 (the null the statistics test against)")
        if self.cells_per_batch < 1:
            raise ValueError(f"--cells-per-batch {self.cells_per_batch} must be at least 1")
        start, goal = self.states
        if (start is None) != (goal is None):
            raise ValueError("--start-state and --goal-state go together (cells of the start state are moved towards the goal)")
        if self.alt_states and goal is None:
            raise ValueError("--alt-state needs --start-state and --goal-state (alternatives to the goal)")
        for alt in self.alternatives:
            if alt[0] != goal[0]:
                raise ValueError(f"--alt-state {'='.join(alt)}: use the goal's column {goal[0]!r} (states are values of one column)")
        self.cell_filters  # noqa: B018  (parsed here: a malformed filter fails before anything runs)
        self.cell_slice  # noqa: B018
        return self

    @property
    def states(self) -> tuple[list[str] | None, list[str] | None]:
        """([column, value] of the start state, of the goal state), or (None, None)."""
        return parse_state(self.start_state, "--start-state"), parse_state(self.goal_state, "--goal-state")

    @property
    def alternatives(self) -> list[list[str]]:
        return [parse_state(a, "--alt-state") for a in self.alt_states]

    @property
    def cell_filters(self) -> list[list]:
        """[[column, [values]], ...] from COLUMN=VALUE[,VALUE...]."""
        filters = []
        for text in self.filters:
            column, value = parse_state(text, "--filter")
            filters.append([column, [v for v in value.split(",") if v]])
        return filters

    @property
    def cell_slice(self) -> list[int] | None:
        if self.cell_range is None:
            return None
        start, sep, end = self.cell_range.partition(":")
        try:
            bounds = [int(start or 0), int(end)]
        except ValueError:
            bounds = None
        if not sep or bounds is None or not 0 <= bounds[0] < bounds[1]:
            raise ValueError(f"--cell-range {self.cell_range!r}: use START:END with 0 <= START < END, e.g. 0:100")
        return bounds


def parse_state(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    column, sep, value = text.partition("=")
    if not sep or not column or not value:
        raise ValueError(f"{flag} {text!r}: use COLUMN=VALUE, e.g. {flag} cell_type=B")
    return [column, value]
