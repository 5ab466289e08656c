"""Pretraining speed: this pipeline vs the Hugging Face Trainer, packing vs length grouping, and model FLOP
utilisation (MFU) per flavour against the device's limit, one JSON line.

    python benchmarks/pretrain_bench.py              # CPU, ~10 min on 2 cores
    python benchmarks/pretrain_bench.py --full       # + 2 workers, bf16 (where the CPU has bf16 units), more repeats
    python benchmarks/pretrain_bench.py --memory     # + one training step of a 4,096-token row per V2 flavour
    python benchmarks/pretrain_bench.py --device cuda                      # one GPU: everything above in bf16

(1) The pipeline, gf-6L-10M on PBMC3k (gc30M, cells cut at --max-length tokens; CPU default 1,024: the
    Trainer's full MLM head cannot fit 12 x 2,048 tokens in 23 GB):
    (a) this pipeline through Ray Train, 1 worker: length-grouped padded batches (a_grouped) and packed rows
        (a_packed, ``data.packing=on``: cells end to end, attention within each cell);
    (b) the Hugging Face Trainer with Geneformer's recipe (DataCollatorForLanguageModeling, group_by_length).
    Interleaved ``--repeats`` times in fresh processes; non-pad tokens/s after warm-up steps, medians.
(2) The model step alone, per flavour (gf-6L-10M, gf-12L-104M, gf-18L-316M): forward, backward and AdamW on
    real PBMC3k cells (gc104M cells for the V2 flavours), the same cells as one packed row and as a padded
    length-grouped batch. MFU = useful FLOPs / time / peak: useful FLOPs counted from the model's shape and the
    non-pad tokens (below), the peak from a matmul measured in the same run and (GPU) from the datasheet.
(3) Memory per device at 4,096 positions (``--memory``; always on a GPU): peak memory of one training step on
    a 4,096-token packed row, with and without activation checkpointing, next to an estimate from the shapes.
(4) CPU: the prediction head's decoder and loss fused (the default on CPUs) against the plain path, the
    quickstart's ``tiny`` and gf-6L-10M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BATCH = 12
MAX_LENGTH = 1024
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100/H200 SXM datasheet, dense


def make_corpus(workdir: Path, vocab: str = "gc30M", max_length: int | None = MAX_LENGTH) -> Path:
    """The bundled PBMC3k tokenized with ``vocab``, cells cut at ``max_length`` tokens (None: the model's 2,048 /
    4,096). The pipeline's gc30M corpus is cut at 1,024 on CPU: with the full 25k-wide MLM head the Trainer
    cannot fit 12 x 2,048 tokens in 23 GB (its length-grouped sampler starts with the longest batch)."""
    from geneformer_ray.cli import DEMO_DATA
    from geneformer_ray.data.tokenize import tokenize
    from geneformer_ray.data.vocab import load_vocab

    corpus = workdir / f"pbmc3k_{vocab}_{max_length or 'full'}"
    if not (corpus / "manifest.json").exists():
        tokenize([DEMO_DATA / "pbmc3k_counts.h5ad"], corpus, vocab=load_vocab(vocab, model_input_size=max_length),
                 cells_per_shard=1000, executor="local", progress=False, overwrite=True)
    return corpus


def hf_trainer(corpus: Path, flavour: str, steps: int, warmup: int, grouped: bool, device: str = "cpu",
               batch: int = BATCH) -> dict:
    """(b): Geneformer's recipe on the Hugging Face Trainer; tokens/s over the steps after warm-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

    from geneformer_ray.models.flavours import build_model
    from geneformer_ray.data.vocab import load_vocab

    vocab = load_vocab("gc30M")
    table = pa.concat_tables([pq.read_table(p, columns=["input_ids"]) for p in sorted(corpus.glob("part-*.parquet"))])
    cells = [{"input_ids": ids} for ids in table.column("input_ids").to_pylist()]  # lengths: the sampler measures them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab.token_ids, unk_token="<pad>")),
                                        pad_token="<pad>", mask_token="<mask>")
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)
    model = build_model(flavour, "gc30M", seed=0)
    tokens, marks = [0], {}

    def count_tokens(module, args, kwargs):  # in the training process, whatever the loader workers do
        tokens[0] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["start"], marks["tokens"] = time.perf_counter(), tokens[0]

        def on_train_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            marks["end"] = time.perf_counter()

    out = tempfile.mkdtemp(prefix="hf-bench-")
    settings = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=warmup + steps, learning_rate=1e-3,
                    warmup_steps=0, weight_decay=0.001, lr_scheduler_type="linear", report_to=[], logging_steps=10_000,
                    save_strategy="no", dataloader_num_workers=4 if device == "cuda" else 0, use_cpu=device == "cpu",
                    bf16=device == "cuda", seed=0)
    try:
        args = TrainingArguments(**settings, train_sampling_strategy="group_by_length" if grouped else "random")
    except TypeError:  # transformers before train_sampling_strategy
        args = TrainingArguments(**settings, group_by_length=grouped)
    trainer = Trainer(model=model, args=args, train_dataset=cells, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    seconds = marks["end"] - marks["start"]
    result = {"tokens_per_s": (tokens[0] - marks["tokens"]) / seconds, "threads": torch.get_num_threads()}
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def ours(corpus: Path, flavour: str, steps: int, warmup: int, workers: int, precision: str, device: str = "cpu",
         batch: int = BATCH, packing: str = "off") -> dict:
    """(1a): the Ray Train pipeline; tokens/s from the log windows after warm-up (its metrics.jsonl)."""
    import ray

    from geneformer_ray.settings import load_config
    from geneformer_ray.train.config import PretrainConfig
    from geneformer_ray.train.pretrain import pretrain

    if device == "cuda":
        ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
        placement = ["accelerator.type=cuda", "accelerator.cpus_per_worker=4"]
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        placement = ["accelerator.type=cpu", f"accelerator.cpus_per_worker={2 // workers}"]
    storage = Path(tempfile.mkdtemp(prefix="ours-bench-"))
    cfg = load_config(PretrainConfig, None, [
        f"data.corpus={corpus}", f"data.batch_size={batch}", f"model.flavour={flavour}", f"data.packing={packing}",
        "optim.warmup_steps=0", f"train.num_workers={workers}", f"train.max_steps={warmup + steps}", "train.epochs=100",
        f"train.log_every={warmup}", "train.val_every=100000", "train.checkpoint_every=100000", f"train.storage_path={storage}",
        "tracking.uri=none", *placement, f"accelerator.precision={precision}"])
    summary = pretrain(cfg)
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines()]
    timed = [w for w in windows if w["step"] > warmup and "tokens_per_s" in w]
    ray.shutdown()
    return {"tokens_per_s": statistics.mean(w["tokens_per_s"] for w in timed),
            "padding_fraction": statistics.mean(w["padding_fraction"] for w in timed),
            "data_wait_fraction": statistics.mean(w["data_wait_fraction"] for w in timed)}


def step_flops(flavour: str, lengths, masked: int) -> float:
    """Useful training FLOPs of one step (forward + backward = 3 x forward), the same however the cells are
    laid out: the encoder's matmuls (2 per weight and token), attention scores and mixing over each cell's
    own tokens (4 * n^2 * h per layer for a cell of n tokens), and the MLM head on the masked tokens only
    (the loss needs no other; a full-vocabulary head spends 1/p times that). Padding counts for nothing."""
    import numpy as np

    from geneformer_ray.data.vocab import load_vocab
    from geneformer_ray.models.flavours import FLAVOURS

    spec = FLAVOURS[flavour]
    h, f, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    vocab_size = load_vocab(spec.vocab).num_tokens
    lengths = np.asarray(lengths, dtype=float)
    encoder = layers * (2 * (4 * h * h + 2 * h * f) * lengths.sum() + 4 * h * (lengths ** 2).sum())
    head = masked * 2 * (h * h + h * vocab_size)
    return 3 * (encoder + head)


def memory_estimate_gib(flavour: str, tokens: int, *, checkpointing: bool, activation_bytes: int = 2) -> dict:
    """What one device holds for a training step on ``tokens`` packed tokens, from the shapes: fp32 weights,
    gradients and AdamW's two moments (16 bytes per parameter), under bf16 autocast the bf16 copies of the
    weights it caches for the step (2 bytes per parameter), and activations. Per layer and token a BERT layer
    keeps ~34 h values at 2 bytes (Korthikanti et al. 2022; with fused attention no seq x seq term), the
    dropout masks included; with activation checkpointing each layer keeps only its input (h values) and one
    layer's worth is rebuilt at a time. The MLM head adds fp32 logits and their gradient for the masked 15%.
    ``activation_bytes``: 2 under bf16 autocast, 4 in fp32."""
    from geneformer_ray.data.vocab import load_vocab
    from geneformer_ray.models.flavours import FLAVOURS

    spec = FLAVOURS[flavour]
    h, layers = spec.hidden_size, spec.num_layers
    vocab = load_vocab(spec.vocab)
    params = (vocab.num_tokens + vocab.model_input_size + 2) * h + layers * (4 * h * h + 2 * h * spec.intermediate_size) \
        + h * h + vocab.num_tokens
    per_layer = tokens * h * 34 * activation_bytes / 2  # bytes
    kept = layers * tokens * h * activation_bytes + per_layer if checkpointing else layers * per_layer
    kept += 0.15 * tokens * vocab.num_tokens * 8  # the head's fp32 logits and their gradient
    states = 16 * params + (2 * params if activation_bytes == 2 else 0)
    return {"parameters_m": round(params / 1e6, 1), "model_states_gib": round(states / 2**30, 2),
            "activations_gib": round(kept / 2**30, 2), "total_gib": round((states + kept) / 2**30, 2)}


def step_batches(cells: list, tokens: int, count: int, rng, *, packing: bool) -> list[list]:
    """``count`` steps of real cells, each up to ``tokens`` real tokens: in random order (packing), or the
    same numbers of cells per step with each step's cells of similar length (length grouping)."""
    batches, current, total = [], [], 0
    for i in rng.permutation(len(cells)):
        if total + len(cells[i]) > tokens and current:
            batches.append(current)
            current, total = [], 0
            if len(batches) == count:
                break
        current.append(cells[i])
        total += len(cells[i])
    if packing:
        return batches
    pool, grouped, at = sorted((c for b in batches for c in b), key=len), [], 0
    for b in batches:
        grouped.append(pool[at: at + len(b)])
        at += len(b)
    return [grouped[i] for i in rng.permutation(len(grouped))]


def model_step(flavour: str, corpus: Path, device: str, precision: str, *, tokens: int, steps: int, warmup: int,
               packing: bool, checkpointing: bool = False, seed: int = 0, fused_head: bool | None = None) -> dict:
    """(2)/(3): forward + backward + AdamW of ``flavour`` on real cells, one process, no Ray. Returns useful
    tokens/s, TFLOP/s, the padding share and the peak memory."""
    import resource

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from geneformer_ray.data.vocab import load_vocab
    from geneformer_ray.models.attention import use_geneformer_attention
    from geneformer_ray.models.flavours import FLAVOURS, MaskedGeneObjective, build_model, checkpoint_activations
    from geneformer_ray.runtime import AcceleratorConfig, autocast, plan_accelerator
    from geneformer_ray.train.collate import IGNORE_INDEX, GeneMasker, pack_cells, pad_cells
    from geneformer_ray.train.common import build_optimizer
    from geneformer_ray.train.config import OptimConfig

    vocab = load_vocab(FLAVOURS[flavour].vocab)
    cells = [np.asarray(c) for p in sorted(corpus.glob("part-*.parquet"))
             for c in pq.read_table(p, columns=["input_ids"]).column(0).to_pylist()]
    batches = step_batches(cells, tokens, warmup + steps, np.random.default_rng(seed), packing=packing)
    plan = plan_accelerator(AcceleratorConfig(type=device, precision=precision), {"GPU": 1} if device == "cuda" else {})
    dev = torch.device(device)
    multiple = 64 if device == "cuda" else 1
    model = build_model(flavour, seed=seed)
    use_geneformer_attention(model)
    if checkpointing:
        checkpoint_activations(model)
    objective = MaskedGeneObjective(model, fused_head=fused_head).to(dev).train()
    optimizer = build_optimizer(objective, OptimConfig(lr=1e-4), plan.kind)
    masker = GeneMasker.for_vocab(vocab, seed=seed)
    timed_tokens, timed_flops, elapsed, padded = 0, 0.0, 0.0, 0
    for step, batch in enumerate(batches):
        if packing:
            row = pack_cells(batch, pad_id=vocab.pad_id, multiple=multiple)
            ids, labels = masker(row["input_ids"])
            feed = {"attention_mask": None, "position_ids": torch.tensor(row["position_ids"]).to(dev),
                    "cu_seqlens": row["cu_seqlens"]}
        else:
            ids, mask = pad_cells(batch, pad_id=vocab.pad_id, multiple=multiple)
            ids, labels = masker(ids)
            feed = {"attention_mask": torch.tensor(mask).to(dev)}
        feed.update(input_ids=torch.tensor(ids).to(dev), labels=torch.tensor(labels).to(dev))
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(plan, dev):
            loss = objective(**feed)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            real = sum(len(c) for c in batch)
            timed_tokens, padded = timed_tokens + real, padded + ids.size - real
            timed_flops += step_flops(flavour, [len(c) for c in batch], int((labels != IGNORE_INDEX).sum()))
    result = {"tokens_per_s": timed_tokens / elapsed, "tflops": timed_flops / elapsed / 1e12,
              "padding_fraction": padded / (padded + timed_tokens), "tokens_per_step": timed_tokens / steps,
              "cells_per_step": statistics.mean(len(b) for b in batches[warmup:]), "loss": float(loss)}
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # the whole process (model, optimizer, activations, libraries): an upper bound
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def matmul_tflops(device: str, dtype: str = "bfloat16", n: int | None = None) -> float:
    """A square matmul on this device, the ceiling measured in the same run (GPU: bf16 8192^3; CPU: fp32
    2048^3 on this process's threads)."""
    import torch

    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    repeats = 10 if device == "cuda" else 4
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e12


def data_path(corpus: Path, seconds: float = 20.0, batch: int = BATCH, max_tokens: int | None = None) -> dict:
    """(c): the pretraining reader (one rank's share of each epoch, straight from the parquet shards) ->
    masked, padded, length-grouped batches, as fast as they come, on one process."""
    from geneformer_ray.data.corpus import read_manifest
    from geneformer_ray.data.vocab import load_vocab
    from geneformer_ray.train.collate import GeneMasker
    from geneformer_ray.train.epoch_data import EpochData

    manifest = read_manifest(corpus)
    vocab = load_vocab(manifest["vocab"]["name"])
    masker = GeneMasker.for_vocab(vocab, seed=0)
    data = EpochData(corpus=corpus, manifest=manifest, seed=0)
    batches = tokens = cells = 0
    started = time.perf_counter()
    first = None
    while time.perf_counter() - started < seconds:
        for item in data.rank_batches(0, 1, pad_id=vocab.pad_id, batch_size=None if max_tokens else batch,
                                      max_tokens=max_tokens, window_batches=64, shuffle_buffer=4096):
            masker(item["input_ids"])
            first = first or time.perf_counter() - started
            batches += 1
            cells += item["attention_mask"].shape[0]
            tokens += int(item["attention_mask"].sum())
            if time.perf_counter() - started >= seconds:
                break
        data.next_epoch()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "cells_per_s": cells / elapsed, "batches_per_s": batches / elapsed,
            "first_batch_s": first}


CASES = {"hf": hf_trainer, "ours": ours, "step": model_step, "data": data_path, "matmul": matmul_tflops}
FLAVOURS_MEASURED = ("gf-6L-10M", "gf-12L-104M", "gf-18L-316M")


def _spawn(name: str, **kwargs) -> dict:
    """One case in a fresh process (its own threads, memory high-water mark and Ray instance)."""
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps({"name": name, "kwargs": kwargs})],
                          capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} {kwargs} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _log(record: dict) -> None:
    print(json.dumps(record), file=sys.stderr, flush=True)


def pipeline(args, corpus: Path) -> dict:
    """(1): this pipeline (length grouping, packing) against the Hugging Face Trainer, interleaved."""
    from geneformer_ray.runtime import cpu_bf16

    common = dict(corpus=str(corpus), flavour="gf-6L-10M", steps=args.steps, warmup=args.warmup, device=args.device,
                  batch=args.batch)
    gpu = args.device == "cuda"
    precision = "bf16" if gpu else "fp32"
    cases = {"b_hf_trainer_group_by_length": ("hf", dict(common, grouped=True)),
             f"a_grouped_1_worker_{precision}": ("ours", dict(common, workers=1, precision=precision, packing="off")),
             f"a_packed_1_worker_{precision}": ("ours", dict(common, workers=1, precision=precision, packing="on"))}
    if args.full:
        cases["b_hf_trainer_random_batches"] = ("hf", dict(common, grouped=False))
        if not gpu:
            for workers, precision in ((2, "fp32"), (1, "bf16"), (2, "bf16")):
                for packing in ("off", "on"):
                    name = f"a_{'packed' if packing == 'on' else 'grouped'}_{workers}_worker{'s' if workers > 1 else ''}_{precision}"
                    cases[name] = ("ours", dict(common, workers=workers, precision=precision, packing=packing))
    bf16, why = (True, "cuda") if gpu else cpu_bf16()
    skipped = {} if bf16 else {k: why for k in cases if k.endswith("_bf16") and not gpu}
    cases = {k: v for k, v in cases.items() if k not in skipped}  # emulated bf16 would take hours and mean nothing
    details: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: drift on a shared box hits every case alike
        for name, (kind, kwargs) in cases.items():
            details[name].append(_spawn(kind, **kwargs))
            _log({name: details[name][-1]})
    median = {k: round(statistics.median(d["tokens_per_s"] for d in v), 1) for k, v in details.items()}
    hf = median["b_hf_trainer_group_by_length"]
    grouped, packed = median[f"a_grouped_1_worker_{'bf16' if gpu else 'fp32'}"], median[f"a_packed_1_worker_{'bf16' if gpu else 'fp32'}"]
    ratios = {f"{k}_over_b": round(v / hf, 2) for k, v in median.items() if k.startswith("a_")}
    ratios["packed_over_grouped"] = round(packed / grouped, 3)
    extra = {}
    if args.full:  # the data path alone: masked, padded, length-grouped batches as fast as one reader makes them
        extra["data_path"] = _spawn("data", corpus=str(corpus), batch=args.batch)
        ratios["data_path_over_training"] = round(extra["data_path"]["tokens_per_s"] / max(v for k, v in median.items() if k.startswith("a_")), 1)
    return {**extra, "unit": "non-pad tokens/s", "results": median, "ratios": ratios, "skipped": skipped,
            "padding_fraction": {k: round(statistics.median(d.get("padding_fraction", 0) for d in v), 4)
                                 for k, v in details.items() if k.startswith("a_")},
            "runs": {k: [round(d["tokens_per_s"], 1) for d in v] for k, v in details.items()}}


def utilisation(args, corpora: dict) -> dict:
    """(2): the model step per flavour, packed and length-grouped, as a share of the device's peak."""
    gpu = args.device == "cuda"
    precision = "bf16" if gpu else "fp32"
    peak = _spawn("matmul", device=args.device, dtype="bfloat16" if gpu else "float32")
    budgets = {"gf-6L-10M": 8192, "gf-12L-104M": 2048, "gf-18L-316M": 1536} if not gpu else \
        {"gf-6L-10M": 65536, "gf-12L-104M": 16384, "gf-18L-316M": 16384}
    steps = {"gf-6L-10M": 2, "gf-12L-104M": 2, "gf-18L-316M": 1} if not gpu else {f: 20 for f in budgets}
    out = {"peak_measured_tflops": round(peak, 3), "peak_from": f"{'bf16 8192^3' if gpu else 'fp32 2048^3'} matmul, same run",
           "peak_datasheet_tflops": H200_BF16_DENSE_TFLOPS if gpu else None, "precision": precision, "flavours": {}}
    for flavour in args.flavours:
        corpus = corpora["gc30M"] if flavour == "gf-6L-10M" else corpora["gc104M"]
        row = {"tokens_per_step": budgets[flavour], "timed_steps": steps[flavour]}
        for packing in (True, False):
            r = _spawn("step", flavour=flavour, corpus=str(corpus), device=args.device, precision=precision,
                       tokens=budgets[flavour], steps=steps[flavour], warmup=1 if not gpu else 5, packing=packing)
            r["mfu_measured"] = round(r["tflops"] / peak, 4)
            if gpu:
                r["mfu_datasheet"] = round(r["tflops"] / H200_BF16_DENSE_TFLOPS, 4)
            row["packed" if packing else "length_grouped"] = r
            _log({flavour: {"packing": packing, **r}})
        row["packed_over_grouped"] = round(row["packed"]["tokens_per_s"] / row["length_grouped"]["tokens_per_s"], 3)
        out["flavours"][flavour] = row
    return out


def head(args, corpora: dict) -> dict:
    """(4) CPU: the model step with the prediction head's last layer and loss fused (the default on CPUs,
    ``geneformer_ray.models.head_loss``) against the plain ``cross_entropy(decoder(h))``: the quickstart's
    ``tiny`` on 16 cells of 256 genes, gf-6L-10M on 8,192 tokens; length-grouped batches, fp32."""
    out = {}
    for flavour, tokens, steps in (("tiny", 4096, 8), ("gf-6L-10M", 8192, 2)):
        row = {"tokens_per_step": tokens, "timed_steps": steps}
        for fused in (True, False):
            r = _spawn("step", flavour=flavour, corpus=str(corpora["gc30M"] if flavour != "tiny" else corpora["tiny"]),
                       device="cpu", precision="fp32", tokens=tokens, steps=steps, warmup=2, packing=False, fused_head=fused)
            row["fused" if fused else "plain"] = {"tokens_per_s": round(r["tokens_per_s"], 1), "loss": round(r["loss"], 4)}
            _log({f"head_{flavour}": {"fused": fused, **r}})
        row["fused_over_plain"] = round(row["fused"]["tokens_per_s"] / row["plain"]["tokens_per_s"], 3)
        out[flavour] = row
    return out


def memory(args, corpora: dict) -> dict:
    """(3): one training step on a 4,096-token packed row per V2 flavour, without and with activation
    checkpointing: measured peak (GPU: allocated; CPU: the process's RSS) and the estimate from the shapes."""
    gpu = args.device == "cuda"
    out = {"measured": "peak allocated GPU memory" if gpu else "peak RSS of the process (fp32; libraries included)"}
    for flavour in ("gf-12L-104M", "gf-18L-316M"):
        for checkpointing in (False, True):
            r = _spawn("step", flavour=flavour, corpus=str(corpora["gc104M"]), device=args.device,
                       precision="bf16" if gpu else "fp32", tokens=4096, steps=1, warmup=0, packing=True,
                       checkpointing=checkpointing)
            key = f"{flavour}{'_checkpointed' if checkpointing else ''}"
            out[key] = {"measured_gib": round(r.get("peak_memory_gib", r.get("peak_rss_gib")), 2),
                        "tokens": round(r["tokens_per_step"]),
                        "estimate_bf16": memory_estimate_gib(flavour, 4096, checkpointing=checkpointing),
                        "estimate_fp32": memory_estimate_gib(flavour, 4096, checkpointing=checkpointing, activation_bytes=4)}
            _log({key: out[key]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, help="timed pipeline steps (default 6 on CPU, 40 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed pipeline steps first (default 2 on CPU, 20 on CUDA)")
    parser.add_argument("--repeats", type=int, help="pipeline cases interleaved this many times (default 1; --full 2)")
    parser.add_argument("--batch", type=int, help="pipeline cells per device and step (default 12 on CPU, 32 on CUDA)")
    parser.add_argument("--max-length", type=int, help="pipeline cells cut here (default 1,024 on CPU, 2,048 on CUDA)")
    parser.add_argument("--flavours", nargs="+", default=list(FLAVOURS_MEASURED), help="model-step flavours")
    parser.add_argument("--full", action="store_true", help="+ 2 workers, bf16 on CPUs with bf16 units, random batches")
    parser.add_argument("--memory", action="store_true", help="+ memory at 4,096 positions (always on CUDA)")
    parser.add_argument("--skip-pipeline", action="store_true", help="the model-step and memory parts only")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gf-pretrain-bench"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        kwargs = {k: Path(v) if k == "corpus" else v for k, v in case["kwargs"].items()}
        result = CASES[case["name"]](**kwargs)
        print(json.dumps(result if isinstance(result, dict) else float(result)))
        return

    import ray
    import torch
    import transformers

    gpu = args.device == "cuda"
    args.steps = args.steps or (40 if gpu else 6)
    args.warmup = args.warmup or (20 if gpu else 2)
    args.repeats = args.repeats or (2 if args.full else 1)
    args.batch = args.batch or (32 if gpu else BATCH)
    started = time.perf_counter()
    workdir = Path(args.workdir)
    corpora = {"gc30M": make_corpus(workdir, "gc30M", args.max_length or (2048 if gpu else MAX_LENGTH)),
               "gc104M": make_corpus(workdir, "gc104M", None)}
    report = {"figure": "pretrain_speed", "device": args.device,
              "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
              "config": {"pipeline": {"flavour": "gf-6L-10M", "batch_per_device": args.batch, "timed_steps": args.steps,
                                      "warmup_steps": args.warmup, "repeats": args.repeats,
                                      "corpus": f"PBMC3k gc30M cut at {args.max_length or (2048 if gpu else MAX_LENGTH)} tokens"},
                         "model_step_corpus": "PBMC3k gc30M (gf-6L-10M, cut as above), gc104M (V2 flavours, whole cells)"}}
    if not args.skip_pipeline:
        report["pipeline"] = pipeline(args, corpora["gc30M"])
    report["utilisation"] = utilisation(args, corpora)
    if not gpu:
        report["fused_head"] = head(args, corpora | {"tiny": make_corpus(workdir, "gc30M", 256)})
    if args.memory or gpu:
        report["memory_4096_positions"] = memory(args, corpora)
    report["targets"] = {"a_over_b": ">= 2", "gf-12L-104M_mfu_on_h200_bf16": ">= 0.40"}
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
                          "python": platform.python_version()}
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
