"""Fine-tuning on Ray Train: cell classification, gene classification (k-fold by gene), multitask.

    geneformer-ray finetune --task cell --config jobs/configs/finetune_cell_type.yaml

``train_loop_per_worker`` runs on every rank: build the task model (checkpoint encoder, fresh head;
frozen layers; LoRA), resume, train with length-grouped batches, evaluate on the validation split
(reported to Ray Train and Tune), and at the end predict the test split and write the evaluation.
``finetune`` (the driver) reads the labels, drops small classes, splits, checks everything before
any worker starts, fits one ``TorchTrainer`` (one per fold for genes), and returns a summary.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray.data
import ray.train
import torch
from pydantic import Field

from geneformer_ray.data.corpus import read_columns, read_corpus, read_manifest
from geneformer_ray.data.vocab import load_vocab
from geneformer_ray.files import write_json
from geneformer_ray.models.attention import use_geneformer_attention
from geneformer_ray.models.flavours import checkpoint_activations
from geneformer_ray.models.tasks import add_lora, build_task_model, freeze_layers, merge_lora
from geneformer_ray.plots import plot_curve
from geneformer_ray.runtime import AcceleratorPlan, autocast, plan_cluster, worker_device
from geneformer_ray.settings import Settings
from geneformer_ray.console import progress_from_metrics, say
from geneformer_ray.tracking import log_final_model, start_tracking
from geneformer_ray.train.checkpoint import load_checkpoint, save_checkpoint
from geneformer_ray.train.common import Ranks, build_optimizer, fit, report, to_device
from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.train.contract import config_terms, corpus_terms, keep_contract
from geneformer_ray.train.loss import TaskLoss, write_test_evaluation
from geneformer_ray.train.prepare import prepare_task
from geneformer_ray.train.schedule import build_scheduler
from geneformer_ray.train.task_batches import MEMORY_TOKENS, SplitBatches, predict_split, split_rows


# -- per worker ------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    memory = config.pop(MEMORY_KEY, None)  # object refs of the splits' rows (data.loader memory), not settings
    run = FinetuneRun.from_dict(config)
    cfg, task, plan = run.config, run.task, run.plan
    kind, heads = task.kind, task.heads
    ranks = Ranks.current()
    device = worker_device(plan)
    vocab = load_vocab(run.vocab_name)

    # setup: task model, frozen layers, adapters, optimizer, schedule, loss
    model = build_task_model(kind, heads, init_from=cfg.model.init_from, flavour=cfg.model.flavour, vocab=vocab,
                             seed=cfg.train.seed, hidden_dropout=cfg.model.hidden_dropout,
                             attention_dropout=cfg.model.attention_dropout)
    max_width = model.config.max_position_embeddings
    if cfg.model.sparse_attention_dropout:
        use_geneformer_attention(model, sparse_dropout=True)
    if cfg.model.activation_checkpointing:
        checkpoint_activations(model)
    freeze_layers(model, cfg.model.freeze_layers, embeddings=cfg.model.freeze_embeddings)
    if cfg.model.lora_rank:
        model = add_lora(model, kind, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout,
                         target_modules=cfg.model.lora_target_modules)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim, plan.kind)
    scheduler = build_scheduler(optimizer, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=run.total_steps)
    loss_fn = TaskLoss(kind, heads, task.class_weights, task.loss_weights, device)

    progress = {"step": 0, "epoch": 0}
    run_id = run.tracking_run_id  # a run to continue when no checkpoint names one (a restarted Tune trial)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler, vocab=vocab,
                                    weights=torch.load(Path(folder) / TRAIN_WEIGHTS, map_location="cpu", weights_only=True))
        progress, run_id = state["progress"], state["tracking_run_id"]
        progress["restarts"] = progress.get("restarts", 0) + 1
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type != "cpu" else None) \
        if ranks.distributed else model
    tracker = start_tracking(run.tracking_uri, experiment=cfg.tracking.experiment, run_name=run.run_name,
                             rank=ranks.rank, params=cfg.to_dict(), run_id=run_id, artifact_location=run.artifact_location,
                             tags=run.tracking_tags, metrics_file=Path(run.run_dir) / "metrics.jsonl")
    splits = SplitBatches(cfg, kind, task.token_classes, plan, vocab, ranks, max_width=max_width, memory=memory)
    evaluate = partial(predict_split, model, splits, loss_fn, plan=plan, device=device, ranks=ranks)
    save = partial(_save_finetune_checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, vocab=vocab,
                   progress=progress, run=run, run_id=tracker.run_id)

    # loop
    model.train()
    window = {"loss": [], "start": time.perf_counter(), "cells": 0}
    history, val_history = [], []
    done = progress["epoch"] >= cfg.train.epochs or (cfg.train.max_steps is not None and progress["step"] >= cfg.train.max_steps)
    last_val: dict = {}
    progress.setdefault("epoch_start", progress["step"])  # the step this epoch began at (epochs_done)
    while not done:
        stream = splits.training(progress["epoch"])
        while True:
            batch = next(stream, None)
            if not ranks.all_have(batch):
                break
            with autocast(plan, device):
                outputs = ddp(**to_device(batch, device, keys=("input_ids", "attention_mask")))
                loss = loss_fn(outputs, torch.from_numpy(batch["labels"]).to(device))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            window["loss"].append(loss.item())
            window["cells"] += batch["input_ids"].shape[0]
            step = progress["step"]
            done = cfg.train.max_steps is not None and step >= cfg.train.max_steps
            if step % cfg.train.log_every == 0:
                loss_mean, cells = ranks.mean([float(np.mean(window["loss"])), window["cells"]])
                elapsed = time.perf_counter() - window["start"]
                history.append((step, loss_mean))
                tracker.log_metrics({"loss": loss_mean, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                     "cells_per_s": cells * ranks.world / elapsed}, step=step)
                window = {"loss": [], "start": time.perf_counter(), "cells": 0}
            if (run.eval_every and step % run.eval_every == 0) or done:
                last_val = _validate(evaluate, loss_fn, run, tracker, step, val_history, ranks, save, progress)
            if done:
                break
        if not done:
            progress["epoch"] += 1
            progress["epoch_start"] = progress["step"]
            done = progress["epoch"] >= cfg.train.epochs
            if not run.eval_every or done:
                last_val = _validate(evaluate, loss_fn, run, tracker, progress["step"], val_history, ranks, save, progress)

    # final: test predictions and evaluation (rank 0 writes), the final checkpoint reported by all
    test = evaluate("test")
    metrics = loss_fn.metrics(test)
    final = {"step": progress["step"], "epoch": progress["epoch"], "restarts": progress.get("restarts", 0),
             "epochs_done": _epochs_done(progress, run.steps_per_epoch),
             "mlflow_run_id": tracker.run_id or "", "final": True,  # not "done": Tune ends a trial on it
             **{f"val_{k}": v for k, v in last_val.items()}, **{f"test_{k}": v for k, v in _headline(metrics).items()}}
    if ranks.rank == 0:
        files = write_test_evaluation(test, metrics, loss_fn, run.run_dir)
        tracker.log_metrics({k: v for k, v in final.items() if k.startswith("test_")}, step=progress["step"])
        for path in files:
            tracker.log_artifact(path, "evaluation")
        if history:
            tracker.log_artifact(plot_curve(history, Path(run.run_dir) / "loss_curve.png", ylabel="training loss",
                                            title=f"{run.run_name}: fine-tuning",
                                            extra={f"validation {loss_fn.headline}": val_history}))
    report(final, rank=ranks.rank, save=save)


def _validate(evaluate, loss_fn, run: FinetuneRun, tracker, step, val_history, ranks, save, progress) -> dict:
    if not run.has_val:
        return {}
    metrics = _headline(loss_fn.metrics(evaluate("val")))
    val_history.append((step, metrics[loss_fn.headline]))
    tracker.log_metrics({f"val_{k}": v for k, v in metrics.items()}, step=step)
    if ranks.rank == 0:
        say(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    report({"step": step, "epoch": progress["epoch"], "epochs_done": _epochs_done(progress, run.steps_per_epoch),
            **{f"val_{k}": v for k, v in metrics.items()}}, rank=ranks.rank, save=save)
    return metrics


def _epochs_done(progress: dict, steps_per_epoch: int) -> float:
    """Whole epochs finished plus the part of the current one (capped at 1: length-grouped batches can make
    an epoch a few steps longer than the nominal cells / batch), so an epoch's end reads as an integer."""
    return progress["epoch"] + min(1.0, (progress["step"] - progress.get("epoch_start", 0)) / steps_per_epoch)


TRAIN_WEIGHTS = "train_weights.pt"


def _save_finetune_checkpoint(folder, *, model, optimizer, scheduler, vocab, progress, run: FinetuneRun, run_id) -> None:
    """The plain HF model (adapters merged into a copy) for use, and the training weights for resume."""
    plain = merge_lora(copy.deepcopy(model)) if hasattr(model, "merge_and_unload") else model
    save_checkpoint(folder, model=plain, optimizer=optimizer, scheduler=scheduler, vocab=vocab, progress=progress,
                    config=run.config.to_dict(), tracking_run_id=run_id)
    torch.save(model.state_dict(), Path(folder) / TRAIN_WEIGHTS)
    (Path(folder) / "task.json").write_text(json.dumps(run.task.model_dump(mode="json", exclude={"token_classes"}), indent=2))


def _headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


# -- driver ----------------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig) -> dict:
    """Check, split and fit; returns paths, metrics and (genes) the per-fold cross-validation."""
    prepared = prepare_task(cfg)
    plan = plan_cluster(cfg.accelerator, num_workers=cfg.train.num_workers)
    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints one line per evaluation
    if cfg.task.kind != "gene":
        summary = fit_split(cfg, plan, prepared, prepared["splits"][0], run_name=cfg.train.run_name)
        if prepared.get("baseline") is not None:
            summary["baseline"] = prepared["baseline"]
        return summary
    return _cross_validate(cfg, plan, prepared)


def _cross_validate(cfg: FinetuneConfig, plan, prepared: dict) -> dict:
    parent = start_tracking(cfg.tracking_uri(), experiment=cfg.tracking.experiment, run_name=cfg.train.run_name, rank=0,
                            params=cfg.to_dict(), artifact_location=cfg.artifact_location())
    folds = []
    for k, split in enumerate(prepared["splits"]):
        summary = fit_split(cfg, plan, prepared, split, run_name=f"{cfg.train.run_name}-fold{k}",
                       tags={"mlflow.parentRunId": parent.run_id, "fold": str(k)} if parent.run_id else None)
        folds.append(summary)
    aucs = np.array([f["metrics"].get("test_roc_auc", np.nan) for f in folds], dtype=float)  # over labelled tokens
    gene_aucs = np.array([f["metrics"].get("test_gene_roc_auc", np.nan) for f in folds], dtype=float)  # over genes
    result = {"folds": folds, "test_roc_auc_per_fold": aucs.tolist(), "test_roc_auc_mean": float(np.nanmean(aucs)),
              "test_roc_auc_sd": float(np.nanstd(aucs, ddof=1)) if aucs.size > 1 else 0.0,
              "test_gene_roc_auc_per_fold": gene_aucs.tolist(), "test_gene_roc_auc_mean": float(np.nanmean(gene_aucs)),
              "tracking_uri": cfg.tracking_uri(), "mlflow_run_id": parent.run_id, "genes": prepared["gene_report"]}
    parent.log_metrics({"test_roc_auc_mean": result["test_roc_auc_mean"], "test_roc_auc_sd": result["test_roc_auc_sd"]}, step=0)
    parent.finish()
    path = write_json(cfg.run_dir() / "cross_validation.json", {k: v for k, v in result.items() if k != "folds"})
    result["summary_file"] = str(path)
    return result


class TaskSpec(Settings):
    """The task a fine-tuning worker trains: its heads' classes and what the loss weighs."""

    kind: str
    heads: dict[str, list[str]]  # {head: class names}
    class_weights: dict[str, list[float]] | None = None  # task.class_weights=balanced: per head, per class
    loss_weights: dict[str, float] = Field(default_factory=dict)  # multitask: per head
    token_classes: dict[str, dict[int, int]] = Field(default_factory=dict)  # gene: {split: {token: class index}}


class FinetuneRun(Settings):
    """What every worker of one fine-tuning run (one fold, one trial) is told; crosses the Ray boundary as ``to_dict()``."""

    config: FinetuneConfig
    task: TaskSpec
    plan: AcceleratorPlan
    vocab_name: str
    total_steps: int
    steps_per_epoch: int
    eval_every: int | None  # None: at the end of every epoch
    run_name: str
    run_dir: str
    tracking_uri: str | None
    artifact_location: str | None
    tracking_tags: dict[str, str] | None = None  # e.g. the parent run of a fold or a trial
    tracking_run_id: str | None = None  # a run to continue (a restarted Tune trial)
    has_val: bool


def fit_split(cfg: FinetuneConfig, plan: AcceleratorPlan, prepared: dict, split: dict, *, run_name: str,
              tags: dict | None = None, callbacks: list | None = None, tracking_run_id: str | None = None) -> dict:
    """Fit one fine-tuning run on one split of ``prepare_task``'s output (a fold, or a Tune trial's run)."""
    run_dir = cfg.run_dir(run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_contract(run_dir, finetune_terms(cfg, prepared, split))
    datasets, memory = _split_data(cfg, split)
    steps_per_epoch = max(1, split["num_train"] // (cfg.data.batch_size * cfg.train.num_workers))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    per_epoch = cfg.train.evals_per_epoch
    eval_every = cfg.train.eval_every or (max(1, steps_per_epoch // per_epoch) if per_epoch else None)  # None: epoch ends
    task = TaskSpec(kind=cfg.task.kind, heads=prepared["heads"], class_weights=split.get("class_weights"),
                    loss_weights=cfg.task.loss_weights, token_classes=split.get("token_classes", {}))
    run = FinetuneRun(config=cfg, task=task, plan=plan, vocab_name=prepared["vocab_name"], total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, eval_every=eval_every, run_name=run_name, run_dir=str(run_dir),
                      tracking_uri=cfg.tracking_uri(), artifact_location=cfg.artifact_location(), tracking_tags=tags,
                      tracking_run_id=tracking_run_id, has_val="val" in datasets or "val" in memory)
    with progress_from_metrics(run_dir / "metrics.jsonl", total=total_steps, desc="fine-tune"):
        result = fit(train_loop_per_worker, {**run.to_dict(), MEMORY_KEY: memory}, datasets=datasets,
                     datasets_to_split=["train"], plan=plan,
                     train_cfg=cfg.train, run_name=run_name, callbacks=callbacks)
    summary = {"checkpoint": result.checkpoint.path, "model": str(Path(result.checkpoint.path) / "model"),
               "metrics": dict(result.metrics), "evaluation": str(run_dir / "evaluation"),
               "loss_curve": str(run_dir / "loss_curve.png"), "metrics_file": str(run_dir / "metrics.jsonl"),
               "tracking_uri": cfg.tracking_uri(),
               "mlflow_run_id": result.metrics.get("mlflow_run_id"), "dropped_classes": prepared["dropped"],
               "split_sizes": {k: int(v) for k, v in split["sizes"].items()}}

    summary["registered_version"] = log_final_model(cfg, run_name, summary)
    return summary


def finetune_terms(cfg: FinetuneConfig, prepared: dict, split: dict) -> dict:
    """What a resumed fine-tuning run must share with the run it resumes: the config less budgets and
    tracking, the corpus by content, the vocabulary, the label set, and the cells of each split."""
    manifest = read_manifest(cfg.data.corpus)
    cells = {name: sorted(map(str, members)) for name, members in split["cells"].items()}
    digest = hashlib.sha256(json.dumps([cells, split.get("genes")], sort_keys=True).encode()).hexdigest()
    return {**config_terms(cfg), **corpus_terms(cfg.data.corpus, manifest, load_vocab(prepared["vocab_name"])),
            "labels": prepared["heads"], "split.cells_sha256": digest,
            "split.sizes": {k: int(v) for k, v in split["sizes"].items()}}


MEMORY_KEY = "_memory_splits"


def _split_data(cfg: FinetuneConfig, split: dict) -> tuple[dict, dict]:
    """Each split's cells with their labels, for the workers: Ray Datasets streaming the corpus rows
    (``data.loader: stream``), or the rows themselves in the object store (``memory``; ``auto`` when all
    splits hold at most ``MEMORY_TOKENS`` tokens), which every worker reads without a Ray Data pass (each
    pass costs seconds of start-up; a small run makes dozens of them)."""
    parts = {name: labels for name, labels in split["cells"].items() if labels}
    members = sorted(set().union(*(labels.keys() for labels in parts.values())))
    loader = cfg.data.loader
    if loader == "auto":
        tokens = pc.sum(read_columns(cfg.data.corpus, ["cell_id", "length"], cell_ids=members)["length"]).as_py() or 0
        loader = "memory" if tokens <= MEMORY_TOKENS else "stream"
    if loader == "memory":
        table = read_columns(cfg.data.corpus, ["input_ids", "length", "cell_id"], cell_ids=members)
        rows = {"input_ids": table.column("input_ids").to_numpy(zero_copy_only=False),
                "length": table.column("length").to_numpy(), "cell_id": np.array(table.column("cell_id").to_pylist(), dtype=object)}
        return {}, {name: ray.put(split_rows(rows, labels)) for name, labels in parts.items()}
    datasets = {}
    for name, labels in parts.items():
        ds = read_corpus(cfg.data.corpus, columns=["input_ids", "length", "cell_id"],
                         shuffle_seed=cfg.train.seed if name == "train" else None)
        datasets[name] = ds.map_batches(split_rows, fn_kwargs={"labels": labels}, batch_format="numpy")
    return datasets, {}


def format_finetune_summary(summary: dict) -> str:
    """What a person reads at the end of `geneformer-ray finetune`."""
    lines = []
    if "folds" in summary:
        aucs = ", ".join(f"{a:.3f}" for a in summary["test_roc_auc_per_fold"])
        lines.append(f"gene classification, {len(summary['folds'])} fold(s): test ROC AUC {summary['test_roc_auc_mean']:.3f} "
                     f"+- {summary['test_roc_auc_sd']:.3f} (per fold: {aucs})")
        lines.append(f"gene-level ROC AUC (each gene's probability averaged over its cells): "
                     f"{summary['test_gene_roc_auc_mean']:.3f} (per fold: {', '.join(f'{a:.3f}' for a in summary['test_gene_roc_auc_per_fold'])})")
        lines.append(f"genes: {summary['genes']}")
        for k, fold in enumerate(summary["folds"]):
            lines.append(f"fold {k}: model {fold['model']}; evaluation {fold['evaluation']}")
        lines.append(f"cross-validation summary: {summary['summary_file']}")
    else:
        m = summary["metrics"]
        lines.append(f"test macro-F1 {m.get('test_macro_f1', float('nan')):.4f}, accuracy {m.get('test_accuracy', float('nan')):.4f}"
                     + (f", ROC AUC {m['test_roc_auc']:.4f}" if "test_roc_auc" in m else "")
                     + f" after {m.get('step')} steps; split sizes {summary['split_sizes']}")
        for head, base in (summary.get("baseline") or {}).items():
            if isinstance(base, dict):
                lines.append(f"baseline ({head}): logistic regression on log-normalised counts, test macro-F1 "
                             f"{base['macro_f1']:.4f}, accuracy {base['accuracy']:.4f}"
                             + (f"; on the genes the model reads (its tokens), {base['same_genes_macro_f1']:.4f} and "
                                f"{base['same_genes_accuracy']:.4f}" if "same_genes_macro_f1" in base else ""))
        if summary.get("dropped_classes"):
            lines.append(f"dropped small classes: {summary['dropped_classes']}")
        lines.append(f"model (Hugging Face folder): {summary['model']}")
        lines.append(f"evaluation (predictions, confusion matrix, ROC): {summary['evaluation']}")
    if summary["tracking_uri"]:
        lines.append(f"MLflow: {summary['tracking_uri']} run {summary['mlflow_run_id']}"
                     + (f" (registered version {summary['registered_version']})" if summary.get("registered_version") else ""))
    return "\n".join(lines)
