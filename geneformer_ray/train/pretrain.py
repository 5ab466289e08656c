"""Masked gene pretraining on Ray Train: the per-worker loop and its driver.

    geneformer-ray pretrain --config jobs/configs/pretrain_tiny.yaml --set train.max_steps=100

``train_loop_per_worker`` runs on every rank: setup, resume, loop, final save. Each rank reads its
share of the epoch's cells (``train.epoch_data``: exactly once per epoch, across failures and resumes
on another number of workers). ``pretrain`` (the driver) checks the config, the corpus's split, the
run's contract (a re-run of the same name resumes it) and the cluster, fits the ``TorchTrainer``,
and returns a summary with where the model, the MLflow run and the loss curve are.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import torch

from geneformer_ray.console import progress_from_metrics, say
from geneformer_ray.data.corpus import read_manifest, split_info
from geneformer_ray.files import write_json
from geneformer_ray.models.attention import use_geneformer_attention
from geneformer_ray.models.flavours import MaskedGeneObjective, build_model, checkpoint_activations
from geneformer_ray.models.folders import load_model, model_vocab, resolve_model_config
from geneformer_ray.models.packing import packing_enabled
from geneformer_ray.plots import plot_curve
from geneformer_ray.runtime import AcceleratorPlan, autocast, pad_multiple, plan_cluster, worker_device
from geneformer_ray.settings import Settings
from geneformer_ray.tracking import log_final_model, start_tracking
from geneformer_ray.train.checkpoint import load_checkpoint, save_checkpoint
from geneformer_ray.train.collate import IGNORE_INDEX, GeneMasker, cell_batches
from geneformer_ray.train.common import Ranks, build_optimizer, fit, report, to_device
from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.train.contract import PRETRAIN_MAY_CHANGE, config_terms, corpus_terms, keep_contract
from geneformer_ray.train.epoch_data import EpochData
from geneformer_ray.train.floors import frequency_floors
from geneformer_ray.train.schedule import build_scheduler


# -- per worker ------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    run = PretrainRun.from_dict(config)
    cfg, plan, total_steps, accum = run.config, run.plan, run.total_steps, run.grad_accum_steps
    ranks = Ranks.current()
    rank, world, distributed = ranks.rank, ranks.world, ranks.distributed
    device = worker_device(plan)
    manifest = read_manifest(cfg.data.corpus)

    # setup: model, optimizer, schedule, data position
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from:
        model, vocab = load_model(cfg.model.init_from)
    else:
        model = build_model(cfg.model.flavour, run.vocab_name, seed=cfg.train.seed)
        vocab = model_vocab(model.config)
        if run.output_bias is not None:
            with torch.no_grad():
                model.cls.predictions.bias.copy_(torch.tensor(run.output_bias))
    # packed rows need its attention; sparse dropout acts only when training on CPU with attention dropout
    use_geneformer_attention(model, sparse_dropout=cfg.model.sparse_attention_dropout)
    if cfg.model.activation_checkpointing:
        checkpoint_activations(model)
    objective = MaskedGeneObjective(model).to(device)
    optimizer = build_optimizer(objective, cfg.optim, plan.kind)
    scheduler = build_scheduler(optimizer, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=total_steps)
    data = EpochData(corpus=cfg.data.corpus, manifest=manifest, seed=cfg.train.seed)
    masker = GeneMasker.for_vocab(vocab, seed=[cfg.train.seed, rank, 0], mlm_probability=cfg.data.mlm_probability)

    # resume: after a worker failure, or a re-run with the same run name (possibly on another number of workers)
    progress = {"step": 0, "epoch": 0, "first_loss": None}
    run_id = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, model=objective.model, optimizer=optimizer, scheduler=scheduler, vocab=vocab)
        progress, run_id = state["progress"], state["tracking_run_id"]
        progress["restarts"] = progress.get("restarts", 0) + 1  # after a failure, or a re-run of the same name
        progress["resumed_from_step"] = progress["step"]
        data, masker.rng = _restore_position(state.get("data"), data, progress, rank=rank, world=world, seed=cfg.train.seed)
        if rank == 0:
            say(f"resuming from the checkpoint at step {progress['step']} (epoch {data.epoch}, "
                f"{int(data.consumed.sum()):,} of {data.num_train:,} cells of it consumed, {world} worker(s), "
                f"{accum} micro-batch(es) per worker and step)")
    ddp = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type != "cpu" else None) \
        if distributed else objective
    tracker = start_tracking(run.tracking_uri, experiment=cfg.tracking.experiment, run_name=cfg.train.run_name,
                             rank=rank, params=cfg.to_dict(), run_id=run_id, artifact_location=run.artifact_location,
                             metrics_file=Path(run.run_dir) / "metrics.jsonl")
    batching = dict(pad_id=vocab.pad_id, batch_size=cfg.data.batch_size, max_tokens=cfg.data.max_tokens,
                    window_batches=cfg.data.window_batches, pad_to_multiple=pad_multiple(plan, cfg.data.pad_to_multiple),
                    max_width=model.config.max_position_embeddings, packing=run.packing)
    val_batches = _validation_batches(data, rank, world, cells=cfg.train.val_batches * run.cells_per_batch,
                                      **batching) if run.has_val else []
    cell_log = _CellLog(cfg.train.cell_log, rank=rank, attempt=progress.get("restarts", 0))

    def validate() -> float | None:
        if not run.has_val:
            return None
        objective.eval()
        held_out = GeneMasker.for_vocab(vocab, seed=[cfg.train.seed, rank, 1], mlm_probability=cfg.data.mlm_probability)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in val_batches:  # the same cells and masks at every pass: comparable losses
                masked, labels = held_out(batch["input_ids"])
                n = int((labels != IGNORE_INDEX).sum())
                if n:
                    with autocast(plan, device):
                        loss = objective(**_feed(batch, masked, labels, device))
                    total, count = total + loss.item() * n, count + n
        objective.train()
        total, count = ranks.mean([total, count])
        return total / count if count else None

    def log_and_report(metrics: dict, *, save: bool) -> None:
        tracker.log_metrics(metrics, step=progress["step"])
        position = _position(data, masker, ranks) if save else None  # collectives: every rank, before the report
        report(metrics, rank=rank, save=(lambda folder: save_checkpoint(
            folder, model=objective.model, optimizer=optimizer, scheduler=scheduler, vocab=vocab, progress=progress,
            config=cfg.to_dict(), tracking_run_id=tracker.run_id, data=position)) if save else None)

    # loop: every step takes `accum` micro-batches on every rank; a rank out of cells joins with
    # zero-weight batches until no rank has any (the epoch's last cells are trained on, not dropped)
    objective.train()
    window = _Window()
    history: list[tuple[int, float]] = []
    filler = _filler_batch(vocab)
    done = cfg.train.max_steps is not None and progress["step"] >= cfg.train.max_steps  # a finished run takes no step
    while not done and data.epoch < cfg.train.epochs:
        stream = data.rank_batches(rank, world, shuffle_buffer=cfg.data.shuffle_buffer, **batching)
        while not done:
            t0 = time.perf_counter()
            micro = [b for b in (next(stream, None) for _ in range(accum)) if b is not None]
            window.wait += time.perf_counter() - t0
            real = round(ranks.mean([len(micro)])[0] * world)
            if real == 0:
                break  # every rank has trained on its share of the epoch
            weight = world / real  # DDP averages over ranks: each real micro-batch gets 1/real of the step
            for i in range(accum):
                batch = micro[i] if i < len(micro) else None
                if batch is not None:
                    masked, labels = masker(batch["input_ids"])
                feed = _feed(batch, masked, labels, device) if batch is not None else to_device(filler, device)
                with (ddp.no_sync() if i < accum - 1 and distributed else nullcontext()), autocast(plan, device):
                    loss = ddp(**feed)
                (loss * (weight if batch is not None else 0.0)).backward()
                if batch is not None:
                    window.add(loss.item(), batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            step = progress["step"]
            cells = np.concatenate([b["cell_index"] for b in micro]) if micro else np.zeros(0, dtype=np.int64)
            data.consumed_by_step(cells)
            cell_log.write(step=step, epoch=data.epoch, cells=cells)
            done = cfg.train.max_steps is not None and step >= cfg.train.max_steps
            if step % cfg.train.log_every == 0 or done:
                metrics = {**window.metrics(ranks, world, accum), "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "step": step, "epoch": data.epoch}
                if progress["first_loss"] is None:
                    progress["first_loss"] = metrics["loss"]
                metrics["first_loss"] = progress["first_loss"]
                history.append((step, metrics["loss"]))
                if step % cfg.train.val_every == 0 or done:
                    metrics["val_loss"] = validate()
                if rank == 0:
                    say(f"step {step}/{total_steps} loss {metrics['loss']:.4f}"
                        + (f" val {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else "")
                        + f" lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tokens/s")
                log_and_report(metrics, save=step % cfg.train.checkpoint_every == 0 and not done)
                window = _Window()
        if not done:
            seen = data.sync(ranks)
            if seen != data.num_train:
                raise RuntimeError(f"epoch {data.epoch} trained on {seen:,} of its {data.num_train:,} training cells")
            data.next_epoch()
            progress["epoch"] = data.epoch

    # final save: every rank reports once more, rank 0 with the checkpoint
    checksums = ranks.gather(sum(float(p.detach().double().sum()) for p in objective.parameters()))
    nodes = ranks.nodes()
    consumed = data.sync(ranks)
    final = {"worker_nodes": nodes, "num_nodes": len(set(nodes)), "step": progress["step"], "epoch": data.epoch,
             "first_loss": progress["first_loss"], "final_loss": history[-1][1] if history else None,
             "val_loss": validate(), "weights_identical_across_ranks": len(set(checksums)) == 1,
             "mlflow_run_id": tracker.run_id or "", "restarts": progress.get("restarts", 0),
             "resumed_from_step": progress.get("resumed_from_step"), "grad_accum_steps": accum, "num_workers": world, "total_steps": total_steps,
             "cells_consumed_in_epoch": consumed, "training_cells": data.num_train, "final": True}
    if rank == 0:
        _finish_tracking(tracker, cfg, run.run_dir)
    log_and_report(final, save=True)  # the model artifact and registration follow on the driver, once persisted


class _Window:
    """Throughput and loss over the steps since the last log line (this rank's real micro-batches)."""

    def __init__(self):
        self.losses, self.tokens, self.cells, self.padded, self.wait = [], 0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, batch: dict) -> None:
        self.losses.append(loss)
        self.tokens += int(batch["attention_mask"].sum())
        self.cells += batch.get("num_cells", batch["attention_mask"].shape[0])  # a packed row holds many
        self.padded += batch["attention_mask"].size

    def metrics(self, ranks: Ranks, world: int, accum: int) -> dict:
        elapsed = time.perf_counter() - self.start
        loss_sum, batches, tokens, cells, padded, wait = ranks.mean(
            [float(np.sum(self.losses)), len(self.losses), self.tokens, self.cells, self.padded, self.wait])
        return {"loss": loss_sum / max(batches, 1e-12), "tokens_per_s": tokens * world / elapsed,
                "cells_per_s": cells * world / elapsed, "padding_fraction": 1 - tokens / max(1, padded),
                "data_wait_fraction": wait / elapsed, "step_time_s": elapsed / max(1.0, batches / accum)}


def _feed(batch: dict, masked: np.ndarray, labels: np.ndarray, device) -> dict:
    """The objective's arguments for a padded batch or a packed row (its offsets stay on the host)."""
    feed = to_device({**batch, "input_ids": masked, "labels": labels}, device,
                     keys=("input_ids", "attention_mask", "labels", "position_ids"))
    return {**feed, "cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else feed


def _filler_batch(vocab) -> dict:
    """A two-token batch with one label: a rank out of cells runs it at weight 0 to keep DDP in step."""
    gene = vocab.token_ids[vocab.gene_tokens[0]]
    return {"input_ids": np.array([[gene, gene]]), "attention_mask": np.ones((1, 2), dtype=np.int64),
            "labels": np.array([[gene, IGNORE_INDEX]])}


def _validation_batches(data: EpochData, rank: int, world: int, *, cells: int, pad_id: int, batch_size, max_tokens,
                        window_batches: int, pad_to_multiple: int, max_width: int, packing: bool) -> list[dict]:
    """This rank's validation batches, read once: the same held-out cells at every pass."""
    ids, lengths = data.validation_cells(rank, world, cells=cells)
    rng = np.random.default_rng([data.seed, rank, 2])
    return [batch for batch, _ in cell_batches(ids, lengths, rng, pad_id=pad_id, batch_size=batch_size,
                                               max_tokens=max_tokens, window_batches=window_batches, packing=packing,
                                               pad_to_multiple=pad_to_multiple, max_width=max_width)] if lengths.size else []


def _position(data: EpochData, masker: GeneMasker, ranks: Ranks) -> dict:
    """The data position a checkpoint carries (collective: every rank's cells and masking RNG gathered)."""
    data.sync(ranks)
    return {**data.state_dict(), "masker_rng": ranks.gather(masker.rng.bit_generator.state)}


def _restore_position(state: dict | None, data: EpochData, progress: dict, *, rank: int, world: int, seed: int):
    """(EpochData, masking RNG) from a checkpoint's data position; the same masking stream per rank when
    the worker count is unchanged, otherwise one drawn from (seed, rank, step)."""
    rng = np.random.default_rng([seed, rank, progress["step"]])
    if not state:  # written by a release without a data position: the checkpoint's epoch starts again
        data.epoch = progress.get("epoch", 0)
        return data, rng
    restored = EpochData.restore(state, corpus=data.corpus, manifest=data.manifest, seed=seed)
    if len(state["masker_rng"]) == world:
        rng.bit_generator.state = state["masker_rng"][rank]
    return restored, rng


class _CellLog:
    """``train.cell_log``: one JSON line per optimizer step and rank with the corpus cell numbers it
    trained on (an audit of what the run saw; the exactly-once tests read it)."""

    def __init__(self, folder: str | None, *, rank: int, attempt: int):
        self.path = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        self.attempt = attempt
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, *, step: int, epoch: int, cells: np.ndarray) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"attempt": self.attempt, "step": step, "epoch": epoch, "time": time.time(),
                                     "cells": cells.tolist()}) + "\n")


def _finish_tracking(tracker, cfg: PretrainConfig, run_dir: str) -> None:
    """The loss curve of the whole run from its metrics file: every attempt and re-run, the windows a
    resumed attempt trained again replacing the ones lost with the failure."""
    loss, val = {}, {}
    metrics_file = Path(run_dir) / "metrics.jsonl"
    for line in metrics_file.read_text().splitlines() if metrics_file.exists() else []:
        window = json.loads(line)
        if window.get("loss") is not None:
            loss[window["step"]] = window["loss"]
        if window.get("val_loss") is not None:
            val[window["step"]] = window["val_loss"]
    if loss:
        png = plot_curve(sorted(loss.items()), Path(run_dir) / "loss_curve.png", title=f"{cfg.train.run_name}: MLM loss",
                         ylabel="loss", extra={"validation loss": sorted(val.items())})
        tracker.log_artifact(png)


# -- driver ----------------------------------------------------------------------------------------
class PretrainRun(Settings):
    """What every worker of a pretraining run is told; crosses the Ray boundary as ``to_dict()``."""

    config: PretrainConfig
    plan: AcceleratorPlan
    vocab_name: str
    total_steps: int
    grad_accum_steps: int  # per worker: the run's global batch / workers (adapts when a resume changes the workers)
    cells_per_batch: int
    run_dir: str
    tracking_uri: str | None
    artifact_location: str | None
    has_val: bool
    output_bias: list[float] | None = None  # model.output_bias=gene_frequency: the head's starting bias, per token
    packing: bool = False  # data.packing resolved for the device: packed rows instead of padded batches


def pretrain(cfg: PretrainConfig) -> dict:
    """Check, build and fit the pretraining run; returns paths and final metrics."""
    manifest = read_manifest(cfg.data.corpus)
    split = check_split(cfg, manifest)
    _, vocab = resolve_model_config(init_from=cfg.model.init_from, flavour=cfg.model.flavour, manifest=manifest,
                                    corpus=cfg.data.corpus)
    plan = plan_cluster(cfg.accelerator, num_workers=cfg.train.num_workers)
    run_dir = cfg.run_dir()
    terms = keep_contract(run_dir, pretrain_terms(cfg, manifest, vocab),
                          facts={"global_micro_batches": cfg.train.num_workers * cfg.optim.grad_accum_steps})
    global_micro = terms["fact.global_micro_batches"]
    accum = grad_accum_for(global_micro, cfg)
    floors = frequency_floors(cfg.data.corpus, vocab) if split["num_val"] or cfg.model.output_bias != "zero" else {}
    cells_per_batch = cfg.data.batch_size or max(1, cfg.data.max_tokens // _median_length(manifest))
    steps_per_epoch = max(1, -(-split["num_train"] // (cells_per_batch * global_micro)))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    run = PretrainRun(config=cfg, plan=plan, vocab_name=vocab.name, total_steps=total_steps, grad_accum_steps=accum,
                      cells_per_batch=cells_per_batch, run_dir=str(run_dir), tracking_uri=cfg.tracking_uri(),
                      artifact_location=cfg.artifact_location(), has_val=split["num_val"] > 0,
                      output_bias=floors["log_frequencies"].tolist() if cfg.model.output_bias == "gene_frequency" else None,
                      packing=packing_enabled(cfg.data.packing))
    with progress_from_metrics(run_dir / "metrics.jsonl", total=total_steps, desc="pretrain"):
        result = fit(train_loop_per_worker, run.to_dict(), datasets={}, datasets_to_split=[], plan=plan, train_cfg=cfg.train)
    model_dir = Path(result.checkpoint.path) / "model"
    summary = {"checkpoint": result.checkpoint.path, "model": str(model_dir), "metrics": dict(result.metrics),
               "corpus": str(cfg.data.corpus), "loss_curve": str(run_dir / "loss_curve.png"), "metrics_file": str(run_dir / "metrics.jsonl"),
               "tracking_uri": cfg.tracking_uri(),
               "mlflow_run_id": result.metrics.get("mlflow_run_id"),
               "floors": {k: v for k, v in floors.items() if k != "log_frequencies"}}
    write_json(run_dir / "floors.json", summary["floors"])
    summary["registered_version"] = log_final_model(cfg, cfg.train.run_name, summary)
    return summary


def check_split(cfg: PretrainConfig, manifest: dict) -> dict:
    """The corpus's recorded split, refused when the config asks for another ``val_fraction``."""
    split = split_info(manifest, corpus=cfg.data.corpus)
    wanted = cfg.data.val_fraction
    if wanted is not None and abs(wanted - split["val_fraction"]) > 1e-12:
        raise ValueError(f"data.val_fraction={wanted} but {cfg.data.corpus} holds out cells with val_fraction "
                         f"{split['val_fraction']} (recorded when it was written); set data.val_fraction to "
                         f"{split['val_fraction']} or null, or write the corpus again with --val-fraction {wanted}")
    return split


def pretrain_terms(cfg: PretrainConfig, manifest: dict, vocab) -> dict:
    """What a resumed pretraining run must share with the run it resumes."""
    return {**config_terms(cfg, allowed=PRETRAIN_MAY_CHANGE), **corpus_terms(cfg.data.corpus, manifest, vocab),
            "split.val_fraction": manifest["split"]["val_fraction"]}


def grad_accum_for(global_micro_batches: int, cfg: PretrainConfig) -> int:
    """Micro-batches per worker and step that keep the run's global batch on ``train.num_workers`` workers."""
    workers = cfg.train.num_workers
    if global_micro_batches % workers:
        divisors = [n for n in range(1, global_micro_batches + 1) if global_micro_batches % n == 0]
        raise ValueError(f"this run's global batch is {global_micro_batches} micro-batches per step, which "
                         f"train.num_workers={workers} does not divide; resume on {', '.join(map(str, divisors))} worker(s)")
    accum = global_micro_batches // workers
    if accum != cfg.optim.grad_accum_steps:
        print(f"gradient accumulation: {accum} micro-batches per worker and step on {workers} worker(s) "
              f"(the run's global batch of {global_micro_batches})", flush=True)
    return accum


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
             + (f", validation loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else "")]
    floors = summary.get("floors", {})
    if m.get("val_loss") is not None and "unigram" in floors:
        lines.append(f"  floors on the validation cells: gene frequencies alone {floors['unigram']:.4f}, by rank "
                     f"{floors['rank']:.4f} (fitted on {floors['train_cells']:,} training cells); the model is "
                     f"{floors['unigram'] - m['val_loss']:.2f} nats under the first, {floors['rank'] - m['val_loss']:.2f} "
                     "under the second")
    lines += [f"model (Hugging Face folder): {summary['model']}", f"checkpoint: {summary['checkpoint']}",
              f"loss curve: {summary['loss_curve']}", f"metrics: {summary['metrics_file']}"]
    if summary["tracking_uri"]:
        lines.append(f"MLflow: {summary['tracking_uri']} run {summary['mlflow_run_id']}"
                     + (f" (registered version {summary['registered_version']})" if summary.get("registered_version") else ""))
    return "\n".join(lines)
