"""A run's contract: what a re-run of the same name must share with the run it resumes.

    terms = {**config_terms(cfg, allowed=PRETRAIN_MAY_CHANGE), **corpus_terms(corpus, manifest, vocab)}
    terms = keep_contract(cfg.run_dir(), terms)     # the run's own terms; refuses a resume that differs

Re-running a pretraining or fine-tuning run with the same ``train.run_name`` and ``storage_path``
continues it from its last checkpoint (Ray Train's resume). That is only sound when the data, the
split, the vocabulary, the task, its labels and the optimisation are those the run started with; a
re-run that changed any of them would silently train on (or evaluate against) something else. The
first start writes ``run_contract.json`` in the run's folder; a re-run that finds a checkpoint beside
it compares, and refuses with the fields that differ. Budgets (epochs, max_steps), tracking, logging
and checkpoint cadence, and where the workers run may change.
"""

from __future__ import annotations

import json
from pathlib import Path

from geneformer_ray.files import write_json

CONTRACT_FILE = "run_contract.json"

# config keys a resume may change (prefixes end with '.'): budgets, cadence, tracking, placement
MAY_CHANGE = ("train.epochs", "train.max_steps", "train.log_every", "train.val_every", "train.eval_every",
              "train.evals_per_epoch", "train.checkpoint_every", "train.num_checkpoints_to_keep", "train.max_failures",
              "train.storage_path", "train.run_name", "train.placement_strategy", "train.cell_log", "tracking.",
              "accelerator.", "data.pad_to_multiple", "data.packing", "data.loader", "data.corpus")  # the corpus by content: corpus_terms
# pretraining also resumes on another number of workers: gradient accumulation keeps the global batch
PRETRAIN_MAY_CHANGE = (*MAY_CHANGE, "train.num_workers", "optim.grad_accum_steps", "data.val_fraction")


def config_terms(cfg, *, allowed: tuple[str, ...] = MAY_CHANGE) -> dict:
    """The config's settings as flat ``section.key`` terms, less the ones a resume may change."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            if not any(name == a or (a.endswith(".") and name.startswith(a)) for a in allowed):
                flat[name] = value
    return flat


def corpus_terms(corpus: str | Path, manifest: dict, vocab) -> dict:
    """Which corpus (its content, not only its path) and vocabulary the run reads."""
    return {"corpus.cells": manifest["num_cells"], "corpus.tokens": manifest["num_tokens"],
            "corpus.created_at": manifest["created_at"], "vocab.sha256": vocab.sha256}


def keep_contract(run_dir: str | Path, terms: dict, *, facts: dict | None = None) -> dict:
    """Write the run's terms on its first start; on a re-run that will resume (a checkpoint exists),
    refuse terms that differ, naming them. ``facts`` are recorded at the first start and kept, not
    compared (e.g. the global batch a resume on other workers keeps). Returns what the run started with."""
    run_dir = Path(run_dir)
    path = run_dir / CONTRACT_FILE
    terms = json.loads(json.dumps(terms))  # as stored: tuples become lists
    facts = {f"fact.{k}": v for k, v in (facts or {}).items()}
    if path.exists() and any(run_dir.glob("checkpoint_*")):
        started = json.loads(path.read_text())
        differ = [k for k in sorted(set(started) | set(terms))
                  if k in started and not k.startswith("fact.") and started.get(k) != terms.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {_short(started.get(k))} -> {_short(terms.get(k))}" for k in differ[:6])
            raise ValueError(
                f"run {run_dir.name!r} in {run_dir.parent} would resume from its checkpoint, but it was started with "
                f"other {', '.join(differ)} ({shown}). A re-run of the same name continues that run, so only budgets "
                f"(train.epochs, train.max_steps), tracking and cadence may change; start a new run with "
                f"--set train.run_name=NEW_NAME (or remove {run_dir} to start this one again)")
        return {**terms, **facts, **started}
    write_json(path, {**terms, **facts})
    return {**terms, **facts}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
