"""Pretraining at Genecorpus scale on this machine: a million-cell corpus, converted, read and trained on.

    python benchmarks/scale_bench.py                     # 100k and 1M cells, ~10-15 min on 2 cores, prints JSON
    python benchmarks/scale_bench.py --cells 3000000     # larger N (disk: ~4.5 GB per million cells)
    python benchmarks/scale_bench.py --train-steps 0     # the measurements without the training run

1. Writes a synthetic Geneformer tokenized dataset (``datasets.save_to_disk`` layout: Arrow stream
   files, state.json, dataset_info.json; checked with ``datasets.load_from_disk``) of N cells whose
   lengths and genes are drawn from PBMC3k's gc30M tokens (a random PBMC3k cell each, about 10% of its
   neighbouring ranks swapped), so it looks like real data. One of 100k cells as well.
2. Converts both with ``geneformer-ray convert-dataset`` (a child process each): cells/s and peak RSS;
   the peak should be flat (N within 20% of 100k).
3. Per-epoch planning and split costs: planning an epoch (``plan_epoch``, manifest + record only) and
   reading the recorded split of every shard, against the per-row hash filter pretraining ran before
   the split was recorded (zlib.crc32 of every cell id, at every pass).
4. Time from ``pretrain`` start to its first optimizer step at 100k and N (2 workers, ``tiny``; Ray
   already running): should stay under 60 s and not grow with N.
5. The data path (one rank's reader: parquet -> masked, padded, length-grouped batches, one process)
   against what one gf-6L-10M worker consumes: measured here on CPU, and the H200 figure README records.
6. A real run: ``tiny`` on 2 workers over the N-cell corpus for ``--train-steps`` steps, a worker
   SIGKILLed after the checkpoint half-way, the run resumed from it: the loss curve on either side of
   the restart, and an audit of the cell log (no cell trained on twice).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H200_GF6L_TOKENS_PER_S = 616_000  # README: one Ray Train worker, gf-6L-10M bf16, NVIDIA H200 (recorded, not measured here)
RECORD_BATCH = 1_000  # rows per Arrow record batch, as datasets' writer uses


# -- 1. a synthetic Genecorpus-layout dataset -----------------------------------------------------
def pbmc3k_cells() -> tuple[np.ndarray, np.ndarray]:
    """PBMC3k's gc30M token ids, flat, with offsets (the bundled demo cells, tokenized here)."""
    import anndata as ad
    import scipy.sparse as sp

    from geneformer_ray.cli import DEMO_DATA
    from geneformer_ray.data.encode import tokenize_anndata

    adata = ad.read_h5ad(DEMO_DATA / "pbmc3k_counts.h5ad")
    adata.X = sp.csr_matrix(adata.X)
    table = tokenize_anndata(adata, vocab="gc30M")
    ids = table["input_ids"].combine_chunks()
    return ids.values.to_numpy(), ids.offsets.to_numpy()


def write_hf_dataset(folder: Path, num_cells: int, values: np.ndarray, offsets: np.ndarray, seed: int = 0) -> dict:
    """``num_cells`` cells in the layout ``Dataset.save_to_disk`` writes (input_ids list<int32>, length)."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lengths_src = np.diff(offsets)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int64())])
    started, tokens = time.perf_counter(), 0
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for begin in range(0, num_cells, RECORD_BATCH):
            n = min(RECORD_BATCH, num_cells - begin)
            src = rng.integers(0, lengths_src.size, n)
            lengths = lengths_src[src]
            starts = offsets[src]
            flat_index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
            flat = values[flat_index].copy()
            # swap ~10% of neighbouring ranks within each cell: the same genes, a slightly different order
            last = np.cumsum(lengths) - 1
            swap = np.flatnonzero(rng.random(flat.size - 1) < 0.1)
            swap = swap[~np.isin(swap, last)]
            swap = swap[np.concatenate([[True], np.diff(swap) > 1])] if swap.size else swap
            flat[swap], flat[swap + 1] = flat[swap + 1], flat[swap].copy()
            cell_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            ids = pa.ListArray.from_arrays(pa.array(cell_offsets), pa.array(flat.astype(np.int32)))
            writer.write_batch(pa.record_batch([ids, pa.array(lengths.astype(np.int64))], schema=schema))
            tokens += int(lengths.sum())
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_fingerprint": f"synthetic{seed}",
                                                   "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                                                   "_output_all_columns": False, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        "input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
        "length": {"dtype": "int64", "_type": "Value"}}}))
    return {"cells": num_cells, "tokens": tokens, "write_s": round(time.perf_counter() - started, 1),
            "arrow_gb": round((folder / name).stat().st_size / 1e9, 2)}


def check_hf_layout(folder: Path, num_cells: int) -> None:
    from datasets import load_from_disk

    ds = load_from_disk(str(folder))
    if ds.num_rows != num_cells or ds.features["input_ids"].feature.dtype != "int32":
        raise RuntimeError(f"{folder}: datasets reads {ds.num_rows} rows / {ds.features}")


# -- 2. conversion ----------------------------------------------------------------------------------
CHILD = """
import json, sys
from geneformer_ray.cli import main
code = main(sys.argv[1:])
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"exit": code, "peak_rss_kb": int(hwm)}))
"""


def convert(dataset: Path, out: Path) -> dict:
    """``geneformer-ray convert-dataset`` in a child process: seconds and that process's peak RSS (its own
    VmHWM: the rusage of a forked child also counts the parent's pages it shared before exec)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "convert-dataset", str(dataset), "--out", str(out),
                           "--vocab", "gc30M", "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"convert-dataset failed: {proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    from geneformer_ray.data.corpus import read_manifest

    manifest = read_manifest(out)
    return {"seconds": round(seconds, 1), "cells_per_s": round(manifest["num_cells"] / seconds),
            "peak_rss_mb": round(child["peak_rss_kb"] / 1024), "shards": len(manifest["shards"]),
            "parquet_gb": round(sum(s["bytes"] for s in manifest["shards"]) / 1e9, 2)}


# -- 3. per-epoch planning and split ----------------------------------------------------------------
def ray_data_filtered_pass(corpus: Path) -> float:
    """The peer: one pass over the training cells as pretraining read them before the split was recorded
    (Ray Data over the shards, a per-row Python filter on the hash of every cell id, at every pass)."""
    import ray.data

    from geneformer_ray.data.corpus import read_corpus, read_manifest

    ray.data.DataContext.get_current().enable_progress_bars = False
    threshold = int(read_manifest(corpus)["split"]["val_fraction"] * 2**32)
    started = time.perf_counter()
    ds = read_corpus(corpus, columns=["input_ids", "length", "cell_id"]).filter(
        lambda row: zlib.crc32(row["cell_id"].encode()) >= threshold)
    rows = sum(len(b["length"]) for b in ds.iter_batches(batch_size=4096, batch_format="numpy"))
    assert rows == read_manifest(corpus)["split"]["num_train"]
    return time.perf_counter() - started


def epoch_costs(corpus: Path) -> dict:
    import pyarrow.parquet as pq

    from geneformer_ray.data.corpus import read_manifest
    from geneformer_ray.train.epoch_data import _in_split, plan_epoch

    manifest = read_manifest(corpus)
    consumed = np.zeros(manifest["num_cells"], dtype=bool)
    started = time.perf_counter()
    plan_epoch(manifest, consumed, seed=0, epoch=1, world=16)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    train = sum(int(_in_split(pq.ParquetFile(corpus / s["path"]), "train").sum()) for s in manifest["shards"])
    split_s = time.perf_counter() - started
    assert train == manifest["split"]["num_train"]
    started = time.perf_counter()  # the peer: what every pass cost before the split was recorded
    threshold = int(manifest["split"]["val_fraction"] * 2**32)
    for s in manifest["shards"]:
        ids = pq.read_table(corpus / s["path"], columns=["cell_id"])["cell_id"].to_pylist()
        [zlib.crc32(c.encode()) >= threshold for c in ids]
    hash_s = time.perf_counter() - started
    return {"plan_epoch_s": round(plan_s, 4), "read_recorded_split_s": round(split_s, 2),
            "per_row_hash_filter_s": round(hash_s, 2)}


# -- 4. time to first step ----------------------------------------------------------------------------
def pretrain_config(corpus: Path, storage: Path, run_name: str, *extra: str):
    from geneformer_ray.settings import load_config
    from geneformer_ray.train.config import PretrainConfig

    return load_config(PretrainConfig, REPO / "geneformer_ray/resources/configs/pretrain_tiny.yaml", [
        f"data.corpus={corpus}", f"train.storage_path={storage}", f"train.run_name={run_name}", "tracking.uri=none",
        f"train.cell_log={storage / run_name / 'cells'}", "accelerator.type=cpu", "train.val_batches=4", *extra])


def first_step(corpus: Path, storage: Path, run_name: str) -> dict:
    from geneformer_ray.train.pretrain import pretrain

    started = time.time()
    pretrain(pretrain_config(corpus, storage, run_name, "train.max_steps=2", "train.val_every=1000"))
    records = [json.loads(line) for p in (storage / run_name / "cells").glob("rank-*.jsonl") for line in p.read_text().splitlines()]
    first = min(r["time"] for r in records if r["step"] == 1)
    return {"seconds_to_first_step": round(first - started, 1)}


# -- 6. a real run with a kill and a resume -----------------------------------------------------------
def train_with_kill(corpus: Path, storage: Path, steps: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from faults import WorkerKiller  # the failure tests' fault injection: SIGKILL of a Ray Train worker

    from geneformer_ray.train.pretrain import pretrain

    checkpoint_every = max(10, steps // 2 // 10 * 10)
    run_dir = storage / "scale"
    killer = WorkerKiller(run_dir, checkpoints=2, timeout=3600)  # once the half-way checkpoint is registered
    started = time.perf_counter()
    summary = pretrain(pretrain_config(corpus, storage, "scale", f"train.max_steps={steps}", "train.log_every=10",
                                       f"train.checkpoint_every={checkpoint_every}", f"train.val_every={checkpoint_every}",
                                       "train.max_failures=2", "optim.warmup_steps=20"))
    seconds = time.perf_counter() - started
    m = summary["metrics"]
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines() if '"loss"' in line]
    kept: dict[int, float] = {}
    for w in windows:  # the resumed attempt's windows replace the lost ones after the checkpoint
        kept[w["step"]] = w["loss"]
    resumed = m.get("resumed_from_step") or 0
    before = [kept[s] for s in sorted(kept) if s <= resumed][-3:]
    after = [kept[s] for s in sorted(kept) if s > resumed][:3]
    cells = [c for p in (run_dir / "cells").glob("rank-*.jsonl") for c in _kept_cells(p.read_text().splitlines())]
    return {"steps": m["step"], "seconds": round(seconds, 1), "killed_worker": bool(killer.killed), "restarts": m["restarts"],
            "resumed_from_step": resumed, "loss_first": round(m["first_loss"], 3), "loss_final": round(m["final_loss"], 3),
            "val_loss": round(m["val_loss"], 3) if m.get("val_loss") else None,
            "loss_3_windows_before_restart": [round(x, 3) for x in before],
            "loss_3_windows_after_restart": [round(x, 3) for x in after],
            "cells_trained": len(cells), "cells_trained_twice": len(cells) - len(set(cells)),
            "loss_curve": summary["loss_curve"]}


def _kept_cells(lines: list[str]) -> list[int]:
    by_step: dict[int, tuple[int, list[int]]] = {}
    for line in lines:
        r = json.loads(line)
        if r["step"] not in by_step or r["attempt"] > by_step[r["step"]][0]:
            by_step[r["step"]] = (r["attempt"], r["cells"])
    return [c for _, cells in by_step.values() for c in cells]


# -- 5. the data path against a gf-6L-10M worker ------------------------------------------------------
def gf6l_worker_tokens_per_s(corpus: Path, seconds: float = 25.0) -> float:
    """What one gf-6L-10M worker consumes on this CPU: this project's loop (masked-only head), batch 12, fp32."""
    import torch

    from geneformer_ray.data.corpus import read_manifest
    from geneformer_ray.models.flavours import MaskedGeneObjective, build_model
    from geneformer_ray.train.collate import GeneMasker
    from geneformer_ray.train.epoch_data import EpochData
    from geneformer_ray.data.vocab import load_vocab

    objective = MaskedGeneObjective(build_model("gf-6L-10M-i2048", "gc30M", seed=0))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    masker = GeneMasker.for_vocab(load_vocab("gc30M"), seed=0)
    data = EpochData(corpus=corpus, manifest=read_manifest(corpus), seed=0)
    tokens, started, warm = 0, None, 0
    for batch in data.rank_batches(0, 1, pad_id=0, batch_size=12, max_tokens=None, window_batches=64, shuffle_buffer=4096):
        masked, labels = masker(batch["input_ids"])
        loss = objective(torch.from_numpy(masked), torch.from_numpy(batch["attention_mask"]), torch.from_numpy(labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warm += 1
        if warm == 2:
            started = time.perf_counter()
        elif started:
            tokens += int(batch["attention_mask"].sum())
            if time.perf_counter() - started > seconds:
                break
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--train-steps", type=int, default=240)
    parser.add_argument("--workdir", default=None, help="folder for the datasets and corpora (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the datasets and corpora")
    parser.add_argument("--out", default="runs/scale_bench", help="where the JSON and the training run's loss curve go")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_bench import data_path

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-bench-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    values, offsets = pbmc3k_cells()
    result: dict = {"machine": f"{os.cpu_count()} cores", "cells": {}}
    for n in (args.small, args.cells):
        dataset, corpus = work / f"hf-{n}", work / f"corpus-{n}"
        entry = {"dataset": write_hf_dataset(dataset, n, values, offsets, seed=n)}
        check_hf_layout(dataset, n)
        entry["convert"] = convert(dataset, corpus)
        entry["epoch"] = epoch_costs(corpus)
        entry["data_path"] = {k: round(v, 2) for k, v in data_path(corpus, seconds=15).items()}
        result["cells"][str(n)] = entry
        print(f"{n:,} cells: {json.dumps(entry)}", file=sys.stderr, flush=True)
    small, large = result["cells"][str(args.small)], result["cells"][str(args.cells)]
    worker = gf6l_worker_tokens_per_s(work / f"corpus-{args.cells}")
    reader = large["data_path"]["tokens_per_s"]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        seconds = ray_data_filtered_pass(work / f"corpus-{args.small}")  # linear in N: measured once, at the small size
        small["epoch"]["ray_data_filtered_pass_s"] = round(seconds, 1)
        small["epoch"]["ray_data_filtered_pass_cells_per_s"] = round(args.small / seconds)
        storage = work / "runs"
        for n in (args.small, args.cells):
            result["cells"][str(n)]["pretrain"] = first_step(work / f"corpus-{n}", storage, f"first-{n}")
        if args.train_steps:
            result["training_run"] = train_with_kill(work / f"corpus-{args.cells}", storage, args.train_steps)
    finally:
        ray.shutdown()
    result["summary"] = {
        "convert_peak_rss_ratio_large_over_small": round(large["convert"]["peak_rss_mb"] / small["convert"]["peak_rss_mb"], 2),
        "convert_cells_per_s": [small["convert"]["cells_per_s"], large["convert"]["cells_per_s"]],
        "convert_cells_per_s_past_startup": round((args.cells - args.small)
                                                  / (large["convert"]["seconds"] - small["convert"]["seconds"])),
        "seconds_to_first_step": [small["pretrain"]["seconds_to_first_step"], large["pretrain"]["seconds_to_first_step"]],
        "recorded_split_vs_per_row_hash_per_epoch": [large["epoch"]["read_recorded_split_s"], large["epoch"]["per_row_hash_filter_s"]],
        "reader_tokens_per_s": reader,
        "reader_cells_per_s_vs_ray_data_filtered_pass": [large["data_path"]["cells_per_s"],
                                                         small["epoch"]["ray_data_filtered_pass_cells_per_s"]],
        "gf6l_worker_tokens_per_s_cpu": round(worker),
        "gf6l_8_workers_tokens_per_s": {"cpu_measured": round(8 * worker), "h200_recorded": 8 * H200_GF6L_TOKENS_PER_S},
        "reader_headroom_over_cpu_worker": round(reader / worker, 1),
        "reader_headroom_over_h200_worker_recorded": round(reader / H200_GF6L_TOKENS_PER_S, 2),
        "note": "each training worker runs its own reader: 8 workers need 8 readers, one per worker process",
        "targets": {"convert_peak_rss_ratio": "<= 1.2", "seconds_to_first_step_at_N": "< 60, not growing with N"},
        "total_seconds": round(time.perf_counter() - started),
    }
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if result.get("training_run"):
        curve = Path(result["training_run"]["loss_curve"])
        if curve.exists():
            result["training_run"]["loss_curve"] = str(shutil.copy(curve, out / "scale_loss_curve.png"))
    (out / "scale_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
