"""Masked gene pretraining on Ray Train: the per-worker loop and its driver.

    geneformer-ray pretrain --config jobs/configs/pretrain_tiny.yaml --set train.max_steps=100

``train_loop_per_worker`` runs on every rank: setup, resume, loop, final save. ``pretrain`` (the
driver) checks the config and the cluster, builds the Ray Datasets and the ``TorchTrainer``, fits,
and returns a summary with where the model, the MLflow run and the loss curve are.
"""

from __future__ import annotations

import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.data
import ray.train
import torch

from geneformer_ray.data.corpus import read_corpus, read_manifest
from geneformer_ray.models.attention import use_sparse_attention_dropout
from geneformer_ray.models.flavours import MaskedGeneObjective, build_model
from geneformer_ray.models.folders import load_model, model_vocab, resolve_model_config
from geneformer_ray.plots import plot_curve
from geneformer_ray.runtime import AcceleratorPlan, autocast, pad_multiple, plan_cluster, worker_device
from geneformer_ray.settings import Settings
from geneformer_ray.tracking import log_final_model, start_tracking
from geneformer_ray.train.checkpoint import load_checkpoint, save_checkpoint
from geneformer_ray.train.collate import GeneMasker, iter_mlm_batches
from geneformer_ray.train.common import Ranks, build_optimizer, fit, report, to_device
from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.train.schedule import build_scheduler


# -- per worker ------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    run = PretrainRun.from_dict(config)
    cfg, plan, total_steps = run.config, run.plan, run.total_steps
    ranks = Ranks.current()
    rank, world, distributed = ranks.rank, ranks.world, ranks.distributed
    device = worker_device(plan)

    # setup: model, optimizer, schedule
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from:
        model, vocab = load_model(cfg.model.init_from)
    else:
        model = build_model(cfg.model.flavour, run.vocab_name, seed=cfg.train.seed)
        vocab = model_vocab(model.config)
    if cfg.model.sparse_attention_dropout:
        use_sparse_attention_dropout(model)  # acts only when training on CPU with attention dropout
    objective = MaskedGeneObjective(model).to(device)
    optimizer = build_optimizer(objective, cfg.optim)
    scheduler = build_scheduler(optimizer, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=total_steps)

    # resume: after a worker failure, or a re-run with the same run name
    progress = {"step": 0, "epoch": 0, "first_loss": None}
    run_id = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, model=objective.model, optimizer=optimizer, scheduler=scheduler, vocab=vocab)
        progress, run_id = state["progress"], state["tracking_run_id"]
        progress["restarts"] = progress.get("restarts", 0) + 1  # after a failure, or a re-run of the same name
        progress["resumed_from_step"] = progress["step"]
        if rank == 0:
            print(f"resuming from the checkpoint at step {progress['step']}", flush=True)
    ddp = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type != "cpu" else None) \
        if distributed else objective
    tracker = start_tracking(run.tracking_uri, experiment=cfg.tracking.experiment, run_name=cfg.train.run_name,
                             rank=rank, params=cfg.to_dict(), run_id=run_id, artifact_location=run.artifact_location,
                             metrics_file=Path(run.run_dir) / "metrics.jsonl")
    masker = GeneMasker.for_vocab(vocab, seed=None, mlm_probability=cfg.data.mlm_probability)
    masker.rng = np.random.default_rng([cfg.train.seed, rank, progress["step"]])  # a resumed run draws fresh, reproducible masks

    def batches(name: str, epoch: int):
        return iter_mlm_batches(ray.train.get_dataset_shard(name), masker=masker, pad_id=vocab.pad_id,
                                batch_size=cfg.data.batch_size, max_tokens=cfg.data.max_tokens,
                                window_batches=cfg.data.window_batches, shuffle_buffer=cfg.data.shuffle_buffer,
                                seed=cfg.train.seed * 1000 + epoch, pad_to_multiple=pad_multiple(plan, cfg.data.pad_to_multiple),
                                max_width=model.config.max_position_embeddings)

    def validate() -> float | None:
        if not run.has_val:
            return None
        objective.eval()
        losses, it = [], batches("val", 0)
        with torch.no_grad():
            for _ in range(cfg.train.val_batches):
                batch = next(it, None)
                if not ranks.all_have(batch):
                    break
                with autocast(plan, device):
                    losses.append(objective(**to_device(batch, device)).item())
        objective.train()
        return ranks.mean([float(np.mean(losses)) if losses else float("nan")])[0]

    def log_and_report(metrics: dict, *, save: bool) -> None:
        tracker.log_metrics(metrics, step=progress["step"])
        report(metrics, rank=rank, save=(lambda folder: save_checkpoint(
            folder, model=objective.model, optimizer=optimizer, scheduler=scheduler, vocab=vocab, progress=progress,
            config=cfg.to_dict(), tracking_run_id=tracker.run_id)) if save else None)

    # loop
    objective.train()
    window = {"loss": [], "tokens": 0, "cells": 0, "padded": 0, "wait": 0.0, "start": time.perf_counter()}
    history: list[tuple[int, float]] = []
    val_history: list[tuple[int, float]] = []
    done = False
    while not done and progress["epoch"] < cfg.train.epochs:
        stream = batches("train", progress["epoch"])
        while not done:
            micro = []
            for _ in range(cfg.optim.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(stream, None)
                window["wait"] += time.perf_counter() - t0
                if not ranks.all_have(batch):
                    break
                micro.append(batch)
            if len(micro) < cfg.optim.grad_accum_steps:
                break  # epoch over on some rank
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1 or not distributed
                with (ddp.no_sync() if not sync else nullcontext()), autocast(plan, device):
                    loss = ddp(**to_device(batch, device)) / len(micro)
                loss.backward()
                window["loss"].append(loss.item() * len(micro))
                window["tokens"] += int(batch["attention_mask"].sum())
                window["cells"] += batch["attention_mask"].shape[0]
                window["padded"] += batch["attention_mask"].size
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            done = cfg.train.max_steps is not None and progress["step"] >= cfg.train.max_steps
            step = progress["step"]
            if step % cfg.train.log_every == 0 or done:
                elapsed = time.perf_counter() - window["start"]
                loss_mean, tokens, cells, padded, wait = ranks.mean(
                    [float(np.mean(window["loss"])), window["tokens"], window["cells"], window["padded"], window["wait"]])
                if progress["first_loss"] is None:
                    progress["first_loss"] = loss_mean
                history.append((step, loss_mean))
                metrics = {"loss": loss_mean, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": tokens * world / elapsed, "cells_per_s": cells * world / elapsed,
                           "padding_fraction": 1 - tokens / max(1, padded), "data_wait_fraction": wait / elapsed,
                           "step_time_s": elapsed / max(1, len(window["loss"]) / cfg.optim.grad_accum_steps),
                           "step": step, "epoch": progress["epoch"], "first_loss": progress["first_loss"]}
                if step % cfg.train.val_every == 0 or done:
                    metrics["val_loss"] = validate()
                    if metrics["val_loss"] is not None:
                        val_history.append((step, metrics["val_loss"]))
                if rank == 0:
                    print(f"step {step}/{total_steps} loss {loss_mean:.4f}"
                          + (f" val {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else "")
                          + f" lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tokens/s", flush=True)
                log_and_report(metrics, save=step % cfg.train.checkpoint_every == 0 and not done)
                window = {"loss": [], "tokens": 0, "cells": 0, "padded": 0, "wait": 0.0, "start": time.perf_counter()}
        if not done:
            progress["epoch"] += 1

    # final save: every rank reports once more, rank 0 with the checkpoint
    checksums = ranks.gather(sum(float(p.detach().double().sum()) for p in objective.parameters()))
    nodes = ranks.nodes()
    final = {"worker_nodes": nodes, "num_nodes": len(set(nodes)), "step": progress["step"], "epoch": progress["epoch"], "first_loss": progress["first_loss"],
             "final_loss": history[-1][1] if history else None, "val_loss": validate(),
             "weights_identical_across_ranks": len(set(checksums)) == 1,
             "mlflow_run_id": tracker.run_id or "", "restarts": progress.get("restarts", 0),
             "resumed_from_step": progress.get("resumed_from_step"), "final": True}
    if rank == 0:
        _finish_tracking(tracker, history, val_history, cfg, run.run_dir)
    log_and_report(final, save=True)  # the model artifact and registration follow on the driver, once persisted


def _finish_tracking(tracker, history, val_history, cfg: PretrainConfig, run_dir: str) -> None:
    if history:
        png = plot_curve(history, Path(run_dir) / "loss_curve.png", title=f"{cfg.train.run_name}: MLM loss",
                         ylabel="loss", extra={"validation loss": val_history})
        tracker.log_artifact(png)


# -- driver ----------------------------------------------------------------------------------------
class PretrainRun(Settings):
    """What every worker of a pretraining run is told; crosses the Ray boundary as ``to_dict()``."""

    config: PretrainConfig
    plan: AcceleratorPlan
    vocab_name: str
    total_steps: int
    run_dir: str
    tracking_uri: str | None
    artifact_location: str | None
    has_val: bool


def pretrain(cfg: PretrainConfig) -> dict:
    """Check, build and fit the pretraining run; returns paths and final metrics."""
    manifest = read_manifest(cfg.data.corpus)
    _, vocab = resolve_model_config(init_from=cfg.model.init_from, flavour=cfg.model.flavour, manifest=manifest,
                                    corpus=cfg.data.corpus)
    plan = plan_cluster(cfg.accelerator, num_workers=cfg.train.num_workers)

    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints one line per log step instead
    columns = ["input_ids", "length", "cell_id"]
    train_ds = read_corpus(cfg.data.corpus, vocab=vocab, columns=columns, shuffle_seed=cfg.train.seed)  # new shard order each epoch
    threshold = int(cfg.data.val_fraction * 2**32)  # validation cells: by a hash of cell_id, stable across runs
    datasets = {"train": train_ds.filter(lambda row: zlib.crc32(row["cell_id"].encode()) >= threshold) if threshold else train_ds}
    num_val = int(round(manifest["num_cells"] * cfg.data.val_fraction))
    if threshold and num_val >= cfg.train.num_workers:
        datasets["val"] = read_corpus(cfg.data.corpus, columns=columns).filter(
            lambda row: zlib.crc32(row["cell_id"].encode()) < threshold)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    cells_per_step = (cfg.data.batch_size or max(1, cfg.data.max_tokens // _median_length(manifest))) \
        * cfg.train.num_workers * cfg.optim.grad_accum_steps
    steps_per_epoch = max(1, int(manifest["num_cells"] * (1 - cfg.data.val_fraction)) // cells_per_step)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    run = PretrainRun(config=cfg, plan=plan, vocab_name=vocab.name, total_steps=total_steps, run_dir=str(run_dir),
                      tracking_uri=cfg.tracking_uri(), artifact_location=cfg.artifact_location(), has_val="val" in datasets)
    result = fit(train_loop_per_worker, run.to_dict(), datasets=datasets, datasets_to_split=list(datasets), plan=plan,
                 train_cfg=cfg.train)
    model_dir = Path(result.checkpoint.path) / "model"
    summary = {"checkpoint": result.checkpoint.path, "model": str(model_dir), "metrics": dict(result.metrics),
               "loss_curve": str(run_dir / "loss_curve.png"), "metrics_file": str(run_dir / "metrics.jsonl"),
               "tracking_uri": cfg.tracking_uri(),
               "mlflow_run_id": result.metrics.get("mlflow_run_id")}
    summary["registered_version"] = log_final_model(cfg, cfg.train.run_name, summary)
    return summary


def _median_length(manifest: dict) -> int:
    counts = np.array(manifest["length_histogram"]["counts"])
    if not counts.sum():
        return 1024
    bin_index = int(np.searchsorted(np.cumsum(counts), counts.sum() / 2))
    return (bin_index + 1) * manifest["length_histogram"]["bin_width"]


def format_pretrain_summary(summary: dict) -> str:
    """What a person reads at the end of `geneformer-ray pretrain`."""
    m = summary["metrics"]
    lines = [f"done: {m.get('step')} steps, loss {m.get('first_loss') or float('nan'):.4f} -> "
             f"{m.get('final_loss') or float('nan'):.4f}"
             + (f", validation loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""),
             f"model (Hugging Face folder): {summary['model']}", f"checkpoint: {summary['checkpoint']}",
             f"loss curve: {summary['loss_curve']}", f"metrics: {summary['metrics_file']}"]
    if summary["tracking_uri"]:
        lines.append(f"MLflow: {summary['tracking_uri']} run {summary['mlflow_run_id']}"
                     + (f" (registered version {summary['registered_version']})" if summary.get("registered_version") else ""))
    return "\n".join(lines)
