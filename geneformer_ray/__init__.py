"""geneformer-ray: Geneformer tokenization, training, tuning and inference on Ray.

    import geneformer_ray as gr
    corpus = gr.tokenize("pbmc3k.h5ad", "runs/corpus", obs=["cell_type"])
    run = gr.pretrain("jobs/configs/pretrain_tiny.yaml", overrides=[f"data.corpus={corpus.path}"])

The functions and result types are those of ``geneformer_ray.api``. The package is laid out by
pipeline stage, each importing only the ones before it:

    settings, files, plots, tracking, runtime,  shared: config loading, atomic outputs, figures, MLflow, Ray + devices,
    console                                     the quiet console (a log file, progress bars)
    data/      raw counts -> corpus folders: vocabularies, readers, rank value encoding, tokenize job, conversion
    models/    flavours, model folders (load / save / vocabulary), task heads, attention
    train/     per-worker loops and drivers of pretraining and fine-tuning, batches, labels, splits, evaluation
    infer/     actor-pool inference: predictions, embeddings, perturbation, their statistics and plots
    hpo/       hyperparameter optimisation (Ray Tune + Optuna) over fine-tuning
    api, cli   the Python API and the command line over it
"""

__version__ = "0.1.0"

_API = ("Corpus", "Embeddings", "Perturbation", "Predictions", "StudyResult", "TrainResult", "convert", "embed",
        "finetune", "load_run_config", "perturb", "perturb_stats", "predict", "pretrain", "quickstart", "run_study",
        "tokenize", "tune", "upgrade_corpus")


def __getattr__(name: str):
    # The API is loaded on first use, not at ``import geneformer_ray``: Ray workers import this package to
    # run one stage's code, and should not pay for every stage's dependencies (~10 s of imports).
    if name in _API:
        from geneformer_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'geneformer_ray' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])


__all__ = list(_API)
