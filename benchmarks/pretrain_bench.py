"""Pretraining throughput: this pipeline vs the Hugging Face Trainer, same model, corpus and machine.

    python benchmarks/pretrain_bench.py [--flavour gf-6L-10M-i2048] [--steps 6] [--repeats 2]

Corpus: the bundled PBMC3k tokenized with gc30M, cells truncated at 1,024 tokens (the Trainer's full
MLM head cannot fit 12 x 2,048 tokens in 23 GB). Model: the flavour, same seed.
  (a) this pipeline through Ray Train (length-grouped batches, masked-only MLM head): 1 worker with
      2 CPU threads, 2 workers with 1 thread each (gloo DDP), fp32 and bf16 autocast;
  (b) the Hugging Face Trainer with DataCollatorForLanguageModeling padding each batch and
      Geneformer's group_by_length, and (b') the same with random batches;
  (c) the data path alone: Ray Data -> masked, padded, length-grouped batches, vs what (a) consumes.
Each configuration is timed after warm-up steps and the configurations are interleaved `--repeats`
times. Prints one JSON line: non-pad tokens/s per case (median over repeats) and the ratios.
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


def make_corpus(workdir: Path) -> Path:
    from geneformer_ray.cli import DEMO_DATA
    from geneformer_ray.tokenize_job import tokenize

    from geneformer_ray.vocab import load_vocab

    # cells truncated at 1,024 tokens (13% of PBMC3k is longer): with the full 25k-wide MLM head the
    # Trainer cannot fit 12 x 2,048 tokens in 23 GB (its length-grouped sampler starts with the longest batch)
    corpus = workdir / f"pbmc3k_gc30M_{MAX_LENGTH}"
    if not (corpus / "manifest.json").exists():
        tokenize([DEMO_DATA / "pbmc3k_counts.h5ad"], corpus, vocab=load_vocab("gc30M", model_input_size=MAX_LENGTH),
                 cells_per_shard=1000, executor="local", progress=False, overwrite=True)
    return corpus


def hf_trainer(corpus: Path, flavour: str, steps: int, warmup: int, grouped: bool) -> dict:
    """(b): Geneformer's recipe on the Hugging Face Trainer; tokens/s over the steps after warm-up."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

    from geneformer_ray.models import build_model
    from geneformer_ray.vocab import load_vocab

    vocab = load_vocab("gc30M")
    table = pa.concat_tables([pq.read_table(p, columns=["input_ids", "length"]) for p in sorted(corpus.glob("part-*.parquet"))])
    dataset = datasets.Dataset(table)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab.token_ids, unk_token="<pad>")),
                                        pad_token="<pad>", mask_token="<mask>")
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)
    tokens, marks = [0], {}

    def counting_collator(features):
        batch = collator(features)
        tokens[0] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((batch["input_ids"] != 0).sum())
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["start"], marks["tokens"] = time.perf_counter(), tokens[0]

    out = tempfile.mkdtemp(prefix="hf-bench-")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=warmup + steps, learning_rate=1e-3,
                             warmup_steps=0, weight_decay=0.001, lr_scheduler_type="linear", report_to=[], logging_steps=10_000,
                             save_strategy="no", dataloader_num_workers=0, use_cpu=True, seed=0,
                             train_sampling_strategy="group_by_length" if grouped else "random",
                             length_column_name="length")
    trainer = Trainer(model=build_model(flavour, "gc30M", seed=0), args=args, train_dataset=dataset,
                      data_collator=counting_collator, callbacks=[Clock()])
    trainer.train()
    seconds = time.perf_counter() - marks["start"]
    # the collator runs ahead of the step by one batch at most: count only steps timed
    return {"tokens_per_s": (tokens[0] - marks["tokens"]) / seconds, "threads": torch.get_num_threads()}


def ours(corpus: Path, flavour: str, steps: int, warmup: int, workers: int, precision: str) -> dict:
    """(a): the Ray Train pipeline; tokens/s from the log windows after warm-up."""
    import mlflow
    import ray

    from geneformer_ray.config import PretrainConfig, load_config
    from geneformer_ray.train.pretrain import pretrain

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    storage = Path(tempfile.mkdtemp(prefix="ours-bench-"))
    cfg = load_config(PretrainConfig, None, [
        f"data.corpus={corpus}", f"data.batch_size={BATCH}", "data.val_fraction=0", f"model.flavour={flavour}",
        "optim.warmup_steps=0", f"train.num_workers={workers}", f"train.max_steps={warmup + steps}", "train.epochs=100",
        f"train.log_every={warmup}", "train.val_every=100000", "train.checkpoint_every=100000", f"train.storage_path={storage}",
        "accelerator.type=cpu", f"accelerator.cpus_per_worker={2 // workers}", f"accelerator.precision={precision}"])
    summary = pretrain(cfg)
    history = mlflow.MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "tokens_per_s")
    timed = [h.value for h in sorted(history, key=lambda h: h.step) if h.step > warmup]
    ray.shutdown()
    return {"tokens_per_s": statistics.mean(timed)}


def data_path(corpus: Path, seconds: float = 20.0) -> dict:
    """(c): Ray Data -> masked, padded, length-grouped batches, as fast as they come."""
    import ray

    from geneformer_ray.collate import GeneMasker, iter_mlm_batches
    from geneformer_ray.corpus import read_corpus
    from geneformer_ray.vocab import load_vocab

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    vocab = load_vocab("gc30M")
    masker = GeneMasker.for_vocab(vocab, seed=0)
    ds = read_corpus(corpus, vocab=vocab, columns=["input_ids", "length"])
    batches = tokens = 0
    started = time.perf_counter()
    epoch = 0
    while time.perf_counter() - started < seconds:
        for batch in iter_mlm_batches(ds, masker=masker, pad_id=0, batch_size=BATCH, max_tokens=None, window_batches=64,
                                      shuffle_buffer=4096, seed=epoch):
            batches += 1
            tokens += int(batch["attention_mask"].sum())
        epoch += 1
    elapsed = time.perf_counter() - started
    ray.shutdown()
    return {"tokens_per_s": tokens / elapsed, "batches_per_s": batches / elapsed}


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
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gf-pretrain-bench"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, corpus, flavour, steps, warmup, *rest = json.loads(args.case)
        corpus = Path(corpus)
        if name == "hf":
            result = hf_trainer(corpus, flavour, steps, warmup, grouped=rest[0])
        elif name == "ours":
            result = ours(corpus, flavour, steps, warmup, workers=rest[0], precision=rest[1])
        else:
            result = data_path(corpus)
        print(json.dumps(result))
        return

    import ray
    import torch
    import transformers

    corpus = make_corpus(Path(args.workdir))
    common = [str(corpus), args.flavour, args.steps, args.warmup]
    cases = {
        "b_hf_trainer_group_by_length": ["hf", *common, True],
        "a_ours_1_worker_fp32": ["ours", *common, 1, "fp32"],
        "b_hf_trainer_random_batches": ["hf", *common, False],
        "a_ours_2_workers_fp32": ["ours", *common, 2, "fp32"],
        "a_ours_1_worker_bf16": ["ours", *common, 1, "bf16"],
        "a_ours_2_workers_bf16": ["ours", *common, 2, "bf16"],
    }
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: drift on a shared box hits every case alike
        for name, case in cases.items():
            runs[name].append(_spawn(case)["tokens_per_s"])
            print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
    data = _spawn(["data", *common])
    median = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    best_ours = max(v for k, v in median.items() if k.startswith("a_"))
    hf = median["b_hf_trainer_group_by_length"]
    print(json.dumps({
        "figure": "pretrain_throughput",
        "unit": "non-pad tokens/s",
        "config": {"flavour": args.flavour, "batch_per_device": BATCH, "timed_steps": args.steps, "warmup_steps": args.warmup,
                   "repeats": args.repeats, "corpus": f"PBMC3k gc30M truncated at {MAX_LENGTH} tokens (2,638 cells)"},
        "results": median,
        "runs": runs,
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
