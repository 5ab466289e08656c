"""The `geneformer-ray` command: each subcommand parses its arguments, calls one function of
``geneformer_ray.api`` and prints what it returned.

    geneformer-ray quickstart --out runs/quickstart
    geneformer-ray tokenize pbmc3k.h5ad --vocab gc30M --out corpus/ --obs cell_type
    geneformer-ray convert-dataset genecorpus.dataset --out corpus/
    geneformer-ray vocab gc104M
    geneformer-ray embed --model runs/quickstart/model --corpus runs/quickstart/corpus --out runs/embed --color cell_type
    geneformer-ray perturb --model ... --corpus ... --out runs/perturb --genes CD74 --perturbation delete
    geneformer-ray perturb-stats runs/perturb --mode mixture_model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import geneformer_ray as gr  # the API loads on first use: --help and usage errors answer in well under a second
from geneformer_ray.console import QuietConsole
from geneformer_ray.data.vocab import load_vocab
from geneformer_ray.files import write_text_atomic
from geneformer_ray.infer.perturb_plan import EMB_MODES as PERTURB_EMB_MODES
from geneformer_ray.infer.perturb_plan import KINDS as PERTURBATIONS
from geneformer_ray.infer.perturb_plan import MEASURES, STATS_MODES

DEMO_DATA = Path(__file__).parent / "resources" / "demo"  # the bundled PBMC3k cells (tests use them too)


def _tokenize(args) -> int:
    return _calmly(args, Path(args.out).absolute() / "tokenize.log", lambda: _tokenized(args))


def _tokenized(args) -> str:
    corpus = gr.tokenize(
        args.inputs, args.out, vocab=args.vocab, obs=[] if args.no_obs else (_parse_obs(args.obs) or None),
        count_column=args.count_column, filter_column=args.filter_column, gene_id_column=args.gene_id_column,
        cell_id_column=args.cell_id_column, layer=args.layer, keep_counts=args.keep_counts,
        allow_non_integer=args.allow_non_integer, sum_duplicates=not args.no_sum_duplicates,
        min_mapped_fraction=args.min_mapped_fraction, val_fraction=args.val_fraction, max_genes=args.max_genes,
        cells_per_shard=args.cells_per_shard, executor="local" if args.local else args.executor, overwrite=args.overwrite,
        progress=not args.quiet)
    return f"{corpus.describe()}\ncorpus: {corpus.path}"


def _convert(args) -> int:
    return _calmly(args, Path(args.out).absolute() / "convert.log", lambda: _converted(args))


def _converted(args) -> str:
    corpus = gr.convert(args.dataset, args.out, vocab=args.vocab, overwrite=args.overwrite,
                        cells_per_shard=args.cells_per_shard, val_fraction=args.val_fraction, progress=not args.quiet)
    return f"converted {corpus.num_cells:,} cells ({corpus.vocab}) into {len(corpus.manifest['shards'])} shard(s): {corpus.path}"


def _upgrade(args) -> int:
    already = "split" in gr.Corpus.open(args.corpus).manifest
    corpus = gr.upgrade_corpus(args.corpus, val_fraction=args.val_fraction, progress=not args.quiet)
    split = corpus.manifest["split"]
    print(f"{corpus.path}: corpus format {corpus.manifest['format_version']}, pretraining split "
          f"{'already recorded, nothing changed' if already else 'recorded'} "
          f"({split['num_train']:,} train / {split['num_val']:,} validation cells, val_fraction {split['val_fraction']})")
    return 0


def _vocab(args) -> int:
    vocab = load_vocab(args.vocab)
    if args.out:
        vocab.save(args.out)
        print(f"saved {vocab.name} to {Path(args.out).absolute()}")
    print(json.dumps(vocab.describe(), indent=2))
    return 0


def _pretrain(args) -> int:
    cfg = gr.load_run_config("pretrain", args.config, overrides=args.set)
    return _calmly(args, cfg.run_dir() / "pretrain.log", lambda: gr.pretrain(cfg).describe())


def _finetune(args) -> int:
    cfg = gr.load_run_config("finetune", args.config, overrides=args.set, task=args.task)
    return _calmly(args, cfg.run_dir() / "finetune.log", lambda: gr.finetune(cfg).describe())


def _tune(args) -> int:
    study, base = gr.load_run_config("tune", args.config, overrides=args.set)
    folder = Path(study.study.storage_path) / study.study.name
    return _calmly(args, folder / "tune.log", lambda: gr.run_study(study, base, resume=args.resume).describe())


def _predict(args) -> int:
    return _calmly(args, Path(args.out).absolute() / "predict.log",
                   lambda: gr.predict(args.model, args.corpus, args.out, **_actor_options(args)).describe())


def _embed(args) -> int:
    return _calmly(args, Path(args.out).absolute() / "embed.log", lambda: gr.embed(
        args.model, args.corpus, args.out, layer=args.layer, mode=args.mode, max_cells=args.max_cells, seed=args.seed,
        h5ad=args.h5ad, adata_path=args.adata, color=args.color, heatmap_by=args.heatmap_by or (args.color[0] if args.color else None),
        packing=args.packing, **_tracking_options(args), **_actor_options(args)).describe())


def _perturb(args) -> int:
    return _calmly(args, Path(args.out).absolute() / "perturb.log", lambda: gr.perturb(
        args.model, args.corpus, args.out, perturbation=args.perturbation, genes=args.genes or [], all_genes=args.all_genes,
        group=args.group, anchor=args.anchor, quartiles=args.quartiles, emb_mode=args.emb_mode, measure=args.measure,
        start_state=args.start_state, goal_state=args.goal_state, alt_states=args.alt_state, filters=args.filter,
        cell_range=args.cell_range, layer=args.layer, max_cells=args.max_cells, null_genes=args.null_genes, seed=args.seed,
        cells_per_batch=args.cells_per_batch, packing=args.packing, progress=not args.quiet, **_tracking_options(args),
        **_actor_options(args)).describe())


def _perturb_stats(args) -> int:
    stats = gr.perturb_stats(args.run, args.mode, null_run=args.null_run, genes=args.genes, metric=args.metric)
    out = Path(args.out or Path(args.run) / f"stats_{args.mode}.csv")
    write_text_atomic(out, stats.to_csv(index=False))
    print(stats.head(args.show).to_string(index=False, max_colwidth=24))
    print(f"{len(stats):,} rows -> {out}")
    return 0


def _actor_options(args) -> dict:
    return {"batch_size": args.batch_size, "num_actors": args.actors, "accelerator": args.accelerator,
            "overwrite": args.overwrite}


def _tracking_options(args) -> dict:
    return {"tracking_uri": args.tracking_uri, "experiment": args.experiment}


def _quickstart(args) -> int:
    out = Path(args.out).absolute()
    return _calmly(args, out / "quickstart.log", lambda: gr.quickstart(
        out, steps=args.steps, finetune_epochs=args.finetune_epochs, overrides=args.set, overwrite=args.overwrite,
        progress=not args.quiet).describe())


def _calmly(args, log_path: Path, work) -> int:
    """Run a command on one calm console: its progress bars and, at the end, the summary block ``work()``
    returns reach the terminal; Ray's, the workers' and the libraries' output goes to ``log_path`` in the
    run folder (``--verbose``: the terminal too), whose path is printed once. An error shows as one
    sentence and the log's path, its traceback in the log. Under ``ray job submit`` the terminal is the
    job's log. A Ray instance this command started is shut down inside the console."""
    with QuietConsole(log_path, verbose=args.verbose, title=f"geneformer-ray {args.command}") as console:
        if not args.verbose:
            console.say(f"log (Ray, workers, libraries): {console.log_path}")
        import ray

        ours = not ray.is_initialized()  # a notebook's or a test's Ray instance stays up
        try:
            summary = work()
            if ours:
                ray.shutdown()  # inside the console: what Ray still forwards from the workers goes to the log
        except Exception as exc:
            if args.verbose:
                raise
            traceback.print_exc()  # into the log
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            kind = "error" if isinstance(exc, ValueError) else f"failed ({type(exc).__name__})"
            console.error(f"geneformer-ray {args.command}: {kind}: {first}\n  the whole account: {console.log_path}")
            return 2 if isinstance(exc, ValueError) else 1
        console.say(summary)
    return 0


def _parse_obs(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        src, _, dst = item.partition("=")
        if not src or (_ and not dst):
            raise ValueError(f"--obs {item!r}: use COLUMN or COLUMN=NEW_NAME")
        mapping[src] = dst or src
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geneformer-ray", description="Geneformer on Ray: tokenize, train, tune, infer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="raw counts (.h5ad/.loom) -> corpus folder of parquet shards")
    p.add_argument("inputs", nargs="+", help=".h5ad/.loom files, folders or glob patterns")
    p.add_argument("--out", required=True, help="corpus folder to write")
    p.add_argument("--vocab", default="gc30M", help="gc30M (V1, 2,048) | gc104M (V2, 4,096) | folder of dictionaries")
    p.add_argument("--obs", action="append", default=[], metavar="COL[=NAME]",
                   help="obs column to carry, optionally renamed (repeatable); default: every obs column")
    p.add_argument("--no-obs", action="store_true", help="carry no obs column")
    p.add_argument("--count-column", default="n_counts", help="obs total counts (computed from the matrix when absent)")
    p.add_argument("--filter-column", default="filter_pass", help="obs column; cells whose value is not 1 are skipped")
    p.add_argument("--gene-id-column", default=None, help="var column with Ensembl IDs or symbols (default: ensembl_id, else the var index)")
    p.add_argument("--cell-id-column", default=None, help="obs column for cell_id (default: obs names)")
    p.add_argument("--layer", default=None, help="count matrix: X (default), raw, or a layer name")
    p.add_argument("--keep-counts", action="store_true", help="also store the raw count behind each token")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer counts")
    p.add_argument("--no-sum-duplicates", action="store_true", help="do not sum genes sharing an Ensembl ID (Geneformer V1 behaviour)")
    p.add_argument("--min-mapped-fraction", type=float, default=0.5, help="refuse inputs whose gene IDs map less than this (default 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="cells held out for pretraining validation, by a hash of the cell id (default 0.02)")
    p.add_argument("--cells-per-shard", type=int, default=10_000, help="cells per task and parquet shard")
    p.add_argument("--max-genes", type=int, default=None,
                   help="keep each cell's top-ranked genes up to this many (default: the model input size)")
    p.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                   help="ray: one Ray task per shard; local: this process; auto (default): local for a single shard")
    p.add_argument("--local", action="store_true", help="same as --executor local")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _verbose_arg(p)
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("convert-dataset", help="Geneformer save_to_disk dataset -> corpus folder (streaming)")
    p.add_argument("dataset", help="folder written by datasets' save_to_disk (e.g. Genecorpus-30M)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", default=None, help="gc30M | gc104M | folder; inferred from the tokens when omitted")
    p.add_argument("--cells-per-shard", type=int, default=50_000)
    p.add_argument("--val-fraction", type=float, default=0.02, help="cells held out for pretraining validation (default 0.02)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _verbose_arg(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("upgrade-corpus", help="record the pretraining split of a corpus written before it was (in place)")
    p.add_argument("corpus", help="corpus folder (format 1)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="cells held out, by a hash of the cell id (default 0.02)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_upgrade)

    p = sub.add_parser("vocab", help="describe a vocabulary; with --out, save it in the safe format")
    p.add_argument("vocab", help="gc30M | gc104M | folder of Geneformer *.pkl dictionaries")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_vocab)

    p = sub.add_parser("pretrain", help="masked gene pretraining on Ray Train")
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    _verbose_arg(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("finetune", help="fine-tune for cell, gene or multitask classification on Ray Train")
    p.add_argument("--task", choices=["cell", "gene", "multitask"], default=None, help="overrides task.kind of the config")
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/finetune_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    _verbose_arg(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("tune", help="hyperparameter search over a fine-tuning config: Ray Tune + Optuna TPE + ASHA")
    p.add_argument("--config", required=True, help="study YAML (see jobs/configs/tune_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a study value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in the same folder (searcher "
                   "state and finished trials kept; the budget counts them)")
    _verbose_arg(p)
    p.set_defaults(func=_tune)

    p = sub.add_parser("predict", help="batch inference of a fine-tuned model over a corpus (Ray Data actor pool)")
    p.add_argument("--model", required=True, help="a fine-tuned model folder (…/checkpoint_…/model)")
    p.add_argument("--corpus", required=True, help="corpus folder (same vocabulary as the model)")
    p.add_argument("--out", required=True, help="output folder: predictions/*.parquet (or gene_predictions.parquet) + summary.json")
    _actor_args(p, default_batch=32)
    _verbose_arg(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("embed", help="cell or gene embeddings (Ray Data actor pool), UMAP and heatmap plots, .h5ad copy")
    p.add_argument("--model", required=True, help="model folder (pretrained or fine-tuned; a Geneformer checkpoint)")
    p.add_argument("--corpus", required=True, help="corpus folder (same vocabulary as the model)")
    p.add_argument("--out", required=True, help="output folder: embeddings/*.parquet or gene_embeddings.parquet, plots")
    p.add_argument("--layer", type=int, default=-1, help="0 = last layer, -1 = second to last (default), ...")
    p.add_argument("--mode", choices=["mean", "cls", "gene"], default="mean",
                   help="mean of gene tokens | <cls> state (V2) | per-gene mean and median over cells")
    p.add_argument("--max-cells", type=int, default=None, help="a seeded sample of this many cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--h5ad", action="store_true", help="also write an .h5ad copy of the tokenized file with obsm['X_geneformer']")
    p.add_argument("--adata", default=None, help="the .h5ad to copy (default: the corpus' own source file); implies --h5ad")
    p.add_argument("--color", action="append", default=[], metavar="COLUMN", help="UMAP coloured by this column (repeatable)")
    p.add_argument("--heatmap-by", default=None, metavar="COLUMN", help="heatmap grouped by this column (default: the first --color)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="cell modes: a batch's cells end to end in one row, attention within each (auto: on)")
    _inference_args(p, default_batch=32, experiment="geneformer-embed")
    _verbose_arg(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("perturb", help="in-silico deletion / over-expression: embedding shifts per gene, statistics, plot")
    p.add_argument("--model", required=True, help="model folder (pretrained or fine-tuned; a Geneformer checkpoint)")
    p.add_argument("--corpus", required=True, help="corpus folder (same vocabulary as the model)")
    p.add_argument("--out", required=True, help="output folder (resumable: re-run the same command to continue)")
    genes = p.add_mutually_exclusive_group(required=True)
    genes.add_argument("--genes", nargs="+", metavar="GENE", help="Ensembl IDs or symbols to perturb")
    genes.add_argument("--all-genes", action="store_true", help="perturb every gene of each cell")
    p.add_argument("--perturbation", choices=list(PERTURBATIONS), required=True,
                   help="delete | overexpress (to the top) | inhibit / activate (down / up by --quartiles of the ranking)")
    p.add_argument("--group", action="store_true", help="perturb the --genes together (one perturbation), not each alone")
    p.add_argument("--anchor", default=None, metavar="GENE", help="the anchor alone, then with each other gene (combos)")
    p.add_argument("--quartiles", type=int, default=1, help="inhibit / activate: quarters of the ranking moved (1-3)")
    p.add_argument("--emb-mode", default="cell", choices=list(PERTURB_EMB_MODES),
                   help="cell (gene-state mean), cls (V2 <cls>), cell_and_gene / cls_and_gene (also every other gene's shift)")
    p.add_argument("--measure", default="geneformer", choices=list(MEASURES),
                   help="the shift tested without states: Geneformer's (default) or 1 - cos of mean-pooled cells")
    p.add_argument("--start-state", default=None, metavar="COL=VALUE", help="perturb cells of this state ...")
    p.add_argument("--goal-state", default=None, metavar="COL=VALUE", help="... and measure their shift towards this one")
    p.add_argument("--alt-state", action="append", default=[], metavar="COL=VALUE", help="an alternative end state (repeatable)")
    p.add_argument("--filter", action="append", default=[], metavar="COL=V1[,V2]", help="only cells with these values (repeatable)")
    p.add_argument("--cell-range", default=None, metavar="START:END", help="the selected cells at these positions")
    p.add_argument("--layer", type=int, default=-1, help="0 = last layer, -1 = second to last (default), ...")
    p.add_argument("--max-cells", type=int, default=None, help="a seeded sample of this many (start-state) cells")
    p.add_argument("--null-genes", type=int, default=5, help="random genes per cell perturbed as the null (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cells-per-batch", type=int, default=8, help="cells per actor call and part file")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="a sub-batch's copies end to end in one row, attention within each (auto: on CUDA / NPU in bf16)")
    p.add_argument("--quiet", action="store_true")
    _inference_args(p, default_batch=64, experiment="geneformer-perturb")
    _verbose_arg(p)
    p.set_defaults(func=_perturb)

    p = sub.add_parser("perturb-stats", help="a statistics mode of Geneformer's InSilicoPerturberStats on a perturb folder")
    p.add_argument("run", help="a geneformer-ray perturb --out folder")
    p.add_argument("--mode", default="vs_random", choices=list(STATS_MODES))
    p.add_argument("--null-run", default=None, help="vs_null: the perturb folder of the null (e.g. control cells)")
    p.add_argument("--genes", nargs="+", default=None, metavar="GENE", help="aggregate_data: these genes only")
    p.add_argument("--metric", default=None, help="the shift column (default: the run's: shift, cell_shift or shift_to_goal)")
    p.add_argument("--out", default=None, help="the CSV to write (default RUN/stats_MODE.csv)")
    p.add_argument("--show", type=int, default=15, help="rows printed")
    p.set_defaults(func=_perturb_stats)

    p = sub.add_parser("quickstart", help="the main job on the bundled PBMC3k data: tokenize, pretrain tiny on 2 CPU "
                       "workers, fine-tune it on the cell types next to logistic regression")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the config's, 200)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: the config's, 8)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--overwrite", action="store_true", help="tokenize again even if the corpus exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _verbose_arg(p)
    p.set_defaults(func=_quickstart)
    return parser


def _verbose_arg(p) -> None:
    p.add_argument("--verbose", action="store_true", help="Ray's, the workers' and the libraries' output on the terminal "
                   "too (otherwise only in the log file in the run folder, whose path is printed first)")


def _actor_args(p, *, default_batch: int) -> None:
    p.add_argument("--batch-size", type=int, default=default_batch, help="sequences per forward pass")
    p.add_argument("--actors", type=int, default=None, help="model actors (default: one per NPU/GPU, or CPUs - 1)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    p.add_argument("--overwrite", action="store_true")


def _inference_args(p, *, default_batch: int, experiment: str) -> None:
    _actor_args(p, default_batch=default_batch)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI: log parameters, plots and tables there (default: $MLFLOW_TRACKING_URI, else none)")
    p.add_argument("--experiment", default=experiment, help="MLflow experiment")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one clear line, no stack trace
        print(f"geneformer-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
