"""Pretraining throughput: this pipeline vs the Hugging Face Trainer, same model, corpus and machine.

    python benchmarks/pretrain_bench.py [--flavour gf-6L-10M-i2048] [--steps 6] [--repeats 2]
    python benchmarks/pretrain_bench.py --device cuda --batch 32 --steps 40 --warmup 10   # one GPU

Corpus: the bundled PBMC3k tokenized with gc30M, cells truncated at --max-length tokens (CPU default
1,024: the Trainer's full MLM head cannot fit 12 x 2,048 tokens in 23 GB). Model: the flavour, same seed.
  (a) this pipeline through Ray Train (length-grouped batches, masked-only MLM head). CPU: 1 worker
      with 2 threads, 2 workers with 1 thread each (gloo DDP), fp32 and bf16 autocast. CUDA: 1 GPU
      worker, bf16 autocast;
  (b) the Hugging Face Trainer with DataCollatorForLanguageModeling padding each batch and
      Geneformer's group_by_length, and (b') the same with random batches (CUDA: bf16, 4 loader workers);
  (c) the data path alone: Ray Data -> masked, padded, length-grouped batches, vs what (a) consumes.
Each configuration is timed after warm-up steps and the configurations are interleaved `--repeats`
times. Prints one JSON line: non-pad tokens/s per case (median over repeats) and the ratios; on CUDA
also the model FLOP utilisation (MFU) of each case, from the useful FLOPs per token (below) against
the datasheet's dense bf16 peak and against a bf16 matmul measured in the same run.
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


def make_corpus(workdir: Path, max_length: int = MAX_LENGTH) -> Path:
    from geneformer_ray.cli import DEMO_DATA
    from geneformer_ray.data.tokenize import tokenize

    from geneformer_ray.data.vocab import load_vocab

    # cells truncated at 1,024 tokens (13% of PBMC3k is longer): with the full 25k-wide MLM head the
    # Trainer cannot fit 12 x 2,048 tokens in 23 GB (its length-grouped sampler starts with the longest batch)
    corpus = workdir / f"pbmc3k_gc30M_{max_length}"
    if not (corpus / "manifest.json").exists():
        tokenize([DEMO_DATA / "pbmc3k_counts.h5ad"], corpus, vocab=load_vocab("gc30M", model_input_size=max_length),
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
         batch: int = BATCH) -> dict:
    """(a): the Ray Train pipeline; tokens/s from the log windows after warm-up (its metrics.jsonl)."""
    import ray

    from geneformer_ray.train.config import PretrainConfig
    from geneformer_ray.settings import load_config
    from geneformer_ray.train.pretrain import pretrain

    if device == "cuda":
        ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
        placement = ["accelerator.type=cuda", "accelerator.cpus_per_worker=4"]
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        placement = ["accelerator.type=cpu", f"accelerator.cpus_per_worker={2 // workers}"]
    storage = Path(tempfile.mkdtemp(prefix="ours-bench-"))
    cfg = load_config(PretrainConfig, None, [
        f"data.corpus={corpus}", f"data.batch_size={batch}", f"model.flavour={flavour}",
        "optim.warmup_steps=0", f"train.num_workers={workers}", f"train.max_steps={warmup + steps}", "train.epochs=100",
        f"train.log_every={warmup}", "train.val_every=100000", "train.checkpoint_every=100000", f"train.storage_path={storage}",
        "tracking.uri=none", *placement, f"accelerator.precision={precision}"])
    summary = pretrain(cfg)
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines()]
    timed = [w for w in windows if w["step"] > warmup and "tokens_per_s" in w]
    ray.shutdown()
    return {"tokens_per_s": statistics.mean(w["tokens_per_s"] for w in timed),
            "data_wait_fraction": statistics.mean(w["data_wait_fraction"] for w in timed)}


def flops_per_token(flavour: str, corpus: Path, mlm_probability: float = 0.15) -> float:
    """Useful training FLOPs per non-pad token (forward + backward = 3 x forward), the same for every case:
    the encoder's matmuls (2 per weight), attention scores and mixing over the cell's own tokens (a token
    of a cell of length n costs 4*n*h per layer; averaged per token that is E[n^2]/E[n]), and the MLM head
    on the masked tokens only (the loss needs no other; a full-vocabulary head spends 1/p times that)."""
    import numpy as np
    import pyarrow.parquet as pq

    from geneformer_ray.models.flavours import FLAVOURS
    from geneformer_ray.data.vocab import load_vocab

    spec = FLAVOURS[flavour]
    h, f, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    vocab_size = load_vocab(spec.vocab).num_tokens
    lengths = np.concatenate([pq.read_table(p, columns=["length"]).column("length").to_numpy()
                              for p in sorted(corpus.glob("part-*.parquet"))]).astype(float)
    per_token_context = float((lengths ** 2).sum() / lengths.sum())
    forward = layers * (2 * (4 * h * h + 2 * h * f) + 4 * per_token_context * h) + mlm_probability * 2 * (h * h + h * vocab_size)
    return 3 * forward


def matmul_tflops() -> float:
    """bf16 8192^3 matmul on this GPU: the ceiling measured in the same run."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


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


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavour", default="gf-6L-10M-i2048")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=BATCH, help="cells per device and step")
    parser.add_argument("--max-length", type=int, help="truncate cells (default 1,024 on CPU, 2,048 on CUDA)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gf-pretrain-bench"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, corpus, flavour, steps, warmup, device, batch, *rest = json.loads(args.case)
        corpus = Path(corpus)
        if name == "hf":
            result = hf_trainer(corpus, flavour, steps, warmup, grouped=rest[0], device=device, batch=batch)
        elif name == "ours":
            result = ours(corpus, flavour, steps, warmup, workers=rest[0], precision=rest[1], device=device, batch=batch)
        else:
            result = data_path(corpus, batch=batch)
        print(json.dumps(result))
        return

    import ray
    import torch
    import transformers

    from geneformer_ray.runtime import cpu_bf16

    max_length = args.max_length or (2048 if args.device == "cuda" else MAX_LENGTH)
    corpus = make_corpus(Path(args.workdir), max_length)
    common = [str(corpus), args.flavour, args.steps, args.warmup, args.device, args.batch]
    if args.device == "cuda":
        cases = {
            "b_hf_trainer_group_by_length": ["hf", *common, True],
            "a_ours_1_gpu_bf16": ["ours", *common, 1, "bf16"],
            "b_hf_trainer_random_batches": ["hf", *common, False],
        }
    else:
        cases = {
            "b_hf_trainer_group_by_length": ["hf", *common, True],
            "a_ours_1_worker_fp32": ["ours", *common, 1, "fp32"],
            "b_hf_trainer_random_batches": ["hf", *common, False],
            "a_ours_2_workers_fp32": ["ours", *common, 2, "fp32"],
            "a_ours_1_worker_bf16": ["ours", *common, 1, "bf16"],
            "a_ours_2_workers_bf16": ["ours", *common, 2, "bf16"],
        }
    bf16, why = (True, args.device) if args.device == "cuda" else cpu_bf16()
    skipped = {} if bf16 else {k: why for k in cases if k.endswith("_bf16")}
    cases = {k: v for k, v in cases.items() if k not in skipped}  # emulated bf16 would take hours and mean nothing
    runs: dict[str, list[float]] = {k: [] for k in cases}
    details: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: drift on a shared box hits every case alike
        for name, case in cases.items():
            details[name].append(_spawn(case))
            runs[name].append(details[name][-1]["tokens_per_s"])
            print(json.dumps({name: details[name][-1]}), file=sys.stderr, flush=True)
    data = _spawn(["data", *common])
    median = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    best_ours = max(v for k, v in median.items() if k.startswith("a_"))
    hf = median["b_hf_trainer_group_by_length"]
    mfu = {}
    if args.device == "cuda":
        flops = flops_per_token(args.flavour, corpus)
        ceiling = matmul_tflops()
        mfu = {"useful_flops_per_token": flops, "measured_bf16_matmul_tflops": round(ceiling, 1),
               "datasheet_bf16_dense_tflops": H200_BF16_DENSE_TFLOPS,
               **{f"{k}_mfu_datasheet": round(v * flops / 1e12 / H200_BF16_DENSE_TFLOPS, 4) for k, v in median.items()},
               **{f"{k}_mfu_measured_matmul": round(v * flops / 1e12 / ceiling, 4) for k, v in median.items()},
               "device_name": torch.cuda.get_device_name()}
    print(json.dumps({
        "figure": "pretrain_throughput",
        "unit": "non-pad tokens/s",
        "config": {"flavour": args.flavour, "device": args.device, "batch_per_device": args.batch, "timed_steps": args.steps,
                   "warmup_steps": args.warmup, "repeats": args.repeats,
                   "corpus": f"PBMC3k gc30M truncated at {max_length} tokens (2,638 cells)"},
        "results": median,
        "skipped": skipped,
        "runs": runs,
        "details": details,
        "mfu": mfu,
        "data_path": data,
        "ratios": {
            "a_best_over_b": round(best_ours / hf, 2),
            **{f"{k}_over_b": round(v / hf, 2) for k, v in median.items() if k.startswith("a_")},
            "b_grouped_over_b_random": round(hf / median["b_hf_trainer_random_batches"], 2),
            "data_path_over_training": round(data["tokens_per_s"] / best_ours, 1),
        },
        "targets": {"a_over_b": ">= 2", "data_path_over_training": ">= 10"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
