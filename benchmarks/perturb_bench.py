"""In-silico perturbation against Geneformer's own procedure: same model, same cells, same machine, one run.

    python benchmarks/perturb_bench.py                        # ~8 min on 2 cores: V1-10M and V2-104M shapes
    python benchmarks/perturb_bench.py --cells 4 --max-genes 0 --v2-cells 1 --v2-max-genes 512   # larger
    python benchmarks/perturb_bench.py --geneformer-src ~/src/Geneformer   # Geneformer's own code as the peer
    python benchmarks/perturb_bench.py --accelerator cuda     # on a GPU: the same, plus bf16

Work: delete every gene of each cell (Geneformer's ``genes_to_perturb="all"``), PBMC3k cells (seeded
sample, optionally cut to their top-ranked ``--max-genes``), models of the published shapes with random
weights (speed and agreement do not depend on the weights): V1-10M (gf-6L-10M-i2048, gc30M, cell mode:
Geneformer's mean of the remaining genes' cosines) and V2-104M (gf-12L-104M-i4096, gc104M, <cls> mode,
as Geneformer requires for <cls> corpora).

The peer is Geneformer's procedure (``InSilicoPerturber.isp_perturb_all``), re-implemented here unless
``--geneformer-src`` names a folder holding Geneformer's package, whose own code then runs (in a
subprocess, its CUDA calls mapped to this device): per cell (longest first), the unperturbed cell
through the full masked-LM model once, then all its perturbed copies in minibatches of
``forward_batch_size`` (100, its default), fp32, each padded to its longest copy with an attention mask,
the hidden states of every layer returned and the chosen one kept, compared with the original with the
deleted position removed. The peer uses every core (torch's intra-op threads), as Geneformer's process does.

This system: (a) the model actor (``Perturber``) in this process on every core: the gain of computing only
what the measure needs (layers up to the chosen one, no MLM head, no all-layer outputs), length-sorted
batches across cells and fused attention; (b) ``geneformer_ray.perturb`` end to end on Ray with 1 and 2
actors (CPU: one core each; start-up, writing, statistics included). Agreement: Spearman between the
per-gene mean shifts of the peer and of (b) under Geneformer's definition, fp32, and the largest
per-perturbation difference. bf16 is measured separately (its own agreement figure) where the device
has bf16 units; skipped, with the reason, elsewhere. Each in-process case runs with the sub-batch layout
``--packing auto`` chooses there (padded on a CPU and in fp32, packed rows on CUDA / NPU in bf16) and again
with the other one (``layouts``: packed vs padded seconds, the largest difference between their shifts).
Prints one JSON line; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PBMC3K = REPO / "geneformer_ray" / "resources" / "demo" / "pbmc3k_counts.h5ad"
MODELS = {"V1-10M": ("gf-6L-10M-i2048", "gc30M", "cell"), "V2-104M": ("gf-12L-104M-i4096", "gc104M", "cls")}
# peak dense bf16 throughput (datasheets), FLOP/s: the projection's denominators
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "Ascend 910B": 313e12}
ASSUMED_MFU = 0.30  # the projection's utilisation: BioNeMo's reported ~32% for a 106M Geneformer on an A100


# -- the peer: Geneformer's procedure ---------------------------------------------------------------------
def geneformer_procedure(model_dir: str, cells: list[list[int]], *, mode: str, device: str, forward_batch_size: int = 100,
                         emb_layer: int = -1) -> dict:
    """Geneformer's ``isp_perturb_all`` (delete, no states): {(cell index, token): cosine}, and timings."""
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(model_dir, output_hidden_states=True, output_attentions=False).to(device).eval()
    layer = model.config.num_hidden_layers + emb_layer  # Geneformer's layer_to_quant
    cos = torch.nn.CosineSimilarity(dim=2)

    def forward(batch: list[list[int]]):
        width = max(len(c) for c in batch)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in batch], device=device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in batch], device=device)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).hidden_states[layer]

    results, passes, tokens = {}, 0, 0
    start = time.perf_counter()
    for index in sorted(range(len(cells)), key=lambda i: -len(cells[i])):
        ids = cells[index]
        original = forward([ids])[0]  # (length, hidden)
        positions = range(1, len(ids) - 1) if mode == "cls" else range(len(ids))  # <cls>, <eos> are not perturbed
        copies = [(i, ids[:i] + ids[i + 1 :]) for i in positions]
        for at in range(0, len(copies), forward_batch_size):
            mini = copies[at : at + forward_batch_size]
            hidden = forward([c for _, c in mini])
            if mode == "cls":
                sims = torch.nn.functional.cosine_similarity(hidden[:, 0], original[0].unsqueeze(0), dim=1)
            else:  # the original with the deleted position removed, against the copy, gene by gene
                comparison = torch.stack([torch.cat([original[:i], original[i + 1 :]]) for i, _ in mini])
                sims = cos(hidden[:, : len(ids) - 1], comparison).mean(1)
            for (i, _), value in zip(mini, sims.tolist()):
                results[index, ids[i]] = value
            passes += len(mini)
            tokens += sum(len(c) for _, c in mini)
        passes += 1
        tokens += len(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"cosines": results, "seconds": time.perf_counter() - start, "forward_passes": passes, "tokens": tokens}


def geneformer_source(src: Path, python: str, model_dir: str, cells: list[list[int]], *, mode: str, device: str,
                      workdir: Path) -> dict:
    """Geneformer's own ``InSilicoPerturber`` from ``src`` on the same cells (an HF dataset on disk), run by
    ``python`` (an interpreter with Geneformer's requirements) in a subprocess; its outputs read back.
    Its ``"cuda"`` calls are mapped to ``device``."""
    data = workdir / "gf_cells.json"  # made into an HF dataset by its own `datasets` (versions differ)
    data.write_text(json.dumps(cells))
    out = workdir / "gf_out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runner = workdir / "run_geneformer.py"
    runner.write_text(RUNNER)
    started = time.perf_counter()
    done = subprocess.run([python, str(runner), str(src), model_dir, str(data), str(out), mode, device,
                           "V2" if mode == "cls" else "V1"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"Geneformer's code failed ({src}, {python}):\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    # its files are numbered by its cell order: longest first, as here
    order = sorted(range(len(cells)), key=lambda i: -len(cells[i]))
    results = {(order[int(h)], int(token)): values[0] for h, genes in measured["cosines"].items()
               for token, values in genes.items()}
    return {"cosines": results, "seconds": measured["seconds"], "wall_seconds": time.perf_counter() - started}


# Geneformer's package is imported by path in a fresh interpreter; torch's "cuda" device strings are mapped
# to the benchmark's device so its GPU-only calls run on a CPU. Its pickled outputs are its own files,
# read back with the standard library's pickle (they hold tuples, strings and floats).
RUNNER = r'''
import json, pickle, re, sys, time
from pathlib import Path
src, model_dir, data, out, mode, device, version = sys.argv[1:8]
import torch
if device != "cuda":
    def _map(d):
        return device if (isinstance(d, str) and d.startswith("cuda")) else d
    _to, _tensor, _mto = torch.Tensor.to, torch.tensor, torch.nn.Module.to
    torch.Tensor.to = lambda self, *a, **k: _to(self, *[_map(x) for x in a], **{n: _map(v) for n, v in k.items()})
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.to = lambda self, *a, **k: _mto(self, *[_map(x) for x in a], **{n: _map(v) for n, v in k.items()})
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.tensor = lambda *a, **k: _tensor(*a, **{n: _map(v) for n, v in k.items()})
    torch.cuda.empty_cache = lambda: None
sys.path.insert(0, src)
from datasets import Dataset
cells = json.loads(Path(data).read_text())
data = str(Path(out) / "cells.dataset")
Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]}).save_to_disk(data)
from geneformer import InSilicoPerturber
isp = InSilicoPerturber(perturb_type="delete", genes_to_perturb="all", model_type="Pretrained", num_classes=0,
                        emb_mode=mode, emb_layer=-1, forward_batch_size=100, nproc=1, model_version=version)
start = time.perf_counter()
isp.perturb_data(model_dir, data, out, "bench")
seconds = time.perf_counter() - start
cosines = {}
for path in sorted(Path(out).glob("*_raw.pickle")):
    found = re.search(r"_dict_cell_embs_(\d+)batch", path.name)
    if not found:
        continue
    with open(path, "rb") as fh:
        for key, values in pickle.load(fh).items():
            cosines.setdefault(found.group(1), {}).setdefault(str(int(key[0])), []).extend(float(v) for v in values)
print(json.dumps({"seconds": seconds, "cosines": cosines}))
'''


# -- this system ------------------------------------------------------------------------------------------
def in_process(model_dir: str, cell_ids: list[str], cells: list[list[int]], out: Path, *, mode: str, device: str,
               precision: str, batch_size: int, packing: bool = False) -> dict:
    """The model actor called in this process on every core, the cells in blocks, nothing else."""
    from geneformer_ray.infer.perturb import PerturbParams
    from geneformer_ray.runtime import AcceleratorConfig, plan_accelerator
    from geneformer_ray.infer.perturb_engine import Perturber

    plan = plan_accelerator(AcceleratorConfig(type=device, precision=precision), {"GPU": 1} if device == "cuda" else {}).to_dict()
    shutil.rmtree(out, ignore_errors=True)
    (out / "shifts").mkdir(parents=True)
    params = PerturbParams(model=model_dir, corpus="", perturbation="delete", emb_mode=mode, null_genes=1)
    actor = Perturber(model_dir, plan, params.__dict__, str(out), batch_size, packing=packing)
    short = cells[-1][:33] + cells[-1][-1:] if mode == "cls" else cells[-1][:32]
    warm = {"cell_id": np.array(["warm"], dtype=object), "input_ids": _objects([short])}
    actor(warm)  # first call: kernels, allocator
    (out / "shifts" / next(p.name for p in (out / "shifts").glob("part-*"))).unlink()
    start = time.perf_counter()
    passes = 0
    for at in range(0, len(cells), 2):
        batch = {"cell_id": np.array(cell_ids[at : at + 2], dtype=object), "input_ids": _objects(cells[at : at + 2])}
        passes += int(actor(batch)["forward_passes"][0])
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    from geneformer_ray.infer.perturb_stats import read_shifts

    return {"seconds": seconds, "forward_passes": passes, "shifts": read_shifts(out / "shifts")}


def _objects(rows):
    array = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        array[i] = np.asarray(row, np.int64)
    return array


def end_to_end(model_dir: str, corpus: str, cell_ids: list[str], out: Path, *, mode: str, actors: int, device: str,
               batch_size: int) -> dict:
    from geneformer_ray.api import perturb
    from geneformer_ray.runtime import AcceleratorConfig

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = perturb(model_dir, corpus, out, perturbation="delete", all_genes=True, emb_mode=mode, cell_range=None,
                  filters=[f"cell_id={','.join(cell_ids)}"], null_genes=1, num_actors=actors, batch_size=batch_size,
                  cells_per_batch=1, accelerator=AcceleratorConfig(type=device), progress=False)
    return {"seconds": time.perf_counter() - start, "shifts": run.shifts(), "summary": run.summary}


# -- comparing --------------------------------------------------------------------------------------------
def per_gene_means(cosines: dict, cell_ids: list[str] | None = None) -> dict[int, float]:
    by_gene: dict[int, list[float]] = {}
    for (_, token), value in cosines.items():
        by_gene.setdefault(int(token), []).append(1.0 - value)
    return {t: float(np.mean(v)) for t, v in by_gene.items()}


def ours_cosines(shifts, cell_ids: list[str]) -> dict:
    position = {c: i for i, c in enumerate(cell_ids)}
    genes = shifts[shifts["role"] == "gene"]
    return {(position[c], int(t)): float(v) for c, t, v in zip(genes["cell_id"], genes["gene_token"], genes["cosine"])}


def agreement(peer: dict, ours: dict) -> dict:
    from scipy.stats import spearmanr

    a, b = per_gene_means(peer), per_gene_means(ours)
    common = sorted(set(a) & set(b))
    shared = sorted(set(peer) & set(ours))
    diff = max((abs(peer[k] - ours[k]) for k in shared), default=float("nan"))
    spread = float(np.std([1 - peer[k] for k in shared])) if shared else float("nan")
    return {"genes": len(common), "spearman_per_gene_mean_shift": round(float(spearmanr([a[g] for g in common],
                                                                                          [b[g] for g in common])[0]), 5),
            "max_abs_cosine_difference": float(f"{diff:.3g}"), "sd_of_shifts": float(f"{spread:.3g}")}


def bf16_support(device: str) -> tuple[bool, str]:
    """Whether bf16 is worth measuring here: GPUs and NPUs have bf16 units; a CPU needs them too."""
    from geneformer_ray.runtime import cpu_bf16

    return (True, device) if device != "cpu" else cpu_bf16()


def flops_per_token(config, length: float, *, head: bool) -> float:
    """Forward FLOPs per token of a BERT encoder (matmuls: 24 h^2 per layer, attention 4 L h), plus the MLM head."""
    h, layers = config.hidden_size, config.num_hidden_layers
    return layers * (24 * h * h + 4 * length * h) + (2 * h * h + 2 * h * config.vocab_size if head else 0)


# -- the run -----------------------------------------------------------------------------------------------
def prepare(name: str, workdir: Path, *, cells: int, max_genes: int, seed: int):
    """The model folder, the corpus and the chosen cells (cut to their top genes) for one model shape."""
    from geneformer_ray.data.tokenize import tokenize
    from geneformer_ray.infer.encoder import read_cells, select_cells
    from geneformer_ray.models.flavours import build_model
    from geneformer_ray.models.folders import save_model

    flavour, vocab, mode = MODELS[name]
    corpus = workdir / f"corpus_{vocab}"
    if not corpus.exists():
        tokenize([PBMC3K], corpus, vocab=vocab, executor="local", progress=False)
    model_dir = workdir / flavour
    if not model_dir.exists():
        save_model(build_model(flavour, vocab, seed=0), model_dir, vocab=vocab)
    ids = select_cells(corpus, max_cells=cells, seed=seed)
    table = read_cells(corpus, ids)
    chosen = [[int(t) for t in c.as_py()] for c in table.column("input_ids")]
    if max_genes:  # the top-ranked genes; a V2 cell keeps its <cls> first and <eos> last
        chosen = [c[: max_genes + 1] + c[-1:] if mode == "cls" and len(c) > max_genes + 2 else c[:max_genes] for c in chosen]
    if max_genes:
        corpus = _cut_corpus(corpus, workdir / f"corpus_{vocab}_top{max_genes}", table, chosen)
    return str(model_dir), str(corpus), table.column("cell_id").to_pylist(), chosen, mode


def _cut_corpus(source: Path, target: Path, table, cells: list[list[int]]) -> Path:
    """A corpus of just the chosen cells with their cut encodings (so the end-to-end run perturbs the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geneformer_ray.data.corpus import read_manifest

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    full = pq.read_table(next(source.glob("part-*.parquet")))
    columns = {n: table.column(n) if n in table.column_names else None for n in full.column_names}
    keep = {n: c for n, c in columns.items() if c is not None}
    keep["input_ids"] = pa.array(cells, full.schema.field("input_ids").type)
    keep["length"] = pa.array([len(c) for c in cells], full.schema.field("length").type)
    pq.write_table(pa.table(keep), target / "part-00000.parquet")
    manifest = read_manifest(source)
    manifest["shards"] = [{**manifest["shards"][0], "path": "part-00000.parquet", "num_cells": len(cells),
                           "num_tokens": sum(len(c) for c in cells)}]
    manifest.update(num_cells=len(cells), num_tokens=sum(len(c) for c in cells))
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def measure(name: str, args, workdir: Path) -> dict:
    import torch
    from transformers import AutoConfig

    from geneformer_ray.models.packing import packed_copies

    cells_n, max_genes = (args.cells, args.max_genes) if name == "V1-10M" else (args.v2_cells, args.v2_max_genes)
    model_dir, corpus, cell_ids, cells, mode = prepare(name, workdir, cells=cells_n, max_genes=max_genes, seed=args.seed)
    config = AutoConfig.from_pretrained(model_dir)
    if args.accelerator == "cpu":
        torch.set_num_threads(os.cpu_count())
    perturbations = sum(len(c) - (2 if mode == "cls" else 0) for c in cells)
    mean_length = float(np.mean([len(c) for c in cells]))
    if args.geneformer_src:
        peer = geneformer_source(Path(args.geneformer_src), args.geneformer_python, model_dir, cells, mode=mode,
                                 device=args.accelerator, workdir=workdir)
        peer_name = f"Geneformer's own code ({args.geneformer_src})"
    else:
        peer = geneformer_procedure(model_dir, cells, mode=mode, device=args.accelerator)
        peer_name = "Geneformer's procedure (isp_perturb_all), re-implemented"
    packed = packed_copies("auto", args.accelerator, None)  # the layout a run chooses by default (``--packing auto``)
    ours = in_process(model_dir, cell_ids, cells, workdir / f"inproc_{name}", mode=mode, device=args.accelerator,
                      precision="fp32", batch_size=args.batch_size, packing=packed)
    runs = []
    if not args.no_ray:
        import ray

        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)  # GPUs: detected
        try:
            for actors in ((1, 2) if args.accelerator == "cpu" else (1,)):
                run = end_to_end(model_dir, corpus, cell_ids, workdir / f"e2e_{name}_{actors}", mode=mode, actors=actors,
                                 device=args.accelerator, batch_size=args.batch_size)
                runs.append({"actors": actors, "seconds": round(run["seconds"], 1),
                             "perturbations_per_s": round(perturbations / run["seconds"], 2),
                             "cells_per_s": round(len(cells) / run["seconds"], 4),
                             "vs_peer": round(peer["seconds"] / run["seconds"], 2),
                             "agreement_with_peer": agreement(peer["cosines"], ours_cosines(run["shifts"], cell_ids))})
        finally:
            ray.shutdown()
    figure = {
        "model": name, "flavour": MODELS[name][0], "emb_mode": mode, "cells": len(cells), "mean_genes_per_cell": round(mean_length, 1),
        "perturbations": perturbations,
        "peer": {"what": peer_name, "seconds": round(peer["seconds"], 1), "perturbations_per_s": round(perturbations / peer["seconds"], 2),
                 "cells_per_s": round(len(cells) / peer["seconds"], 4), "threads": torch.get_num_threads()},
        "in_process": {"seconds": round(ours["seconds"], 1), "perturbations_per_s": round(perturbations / ours["seconds"], 2),
                       "vs_peer": round(peer["seconds"] / ours["seconds"], 2),
                       "agreement_with_peer": agreement(peer["cosines"], ours_cosines(ours["shifts"], cell_ids))},
        "end_to_end": runs,
        "flops_per_token": {"peer": flops_per_token(config, mean_length, head=True),
                            "ours": flops_per_token(config, mean_length, head=False) * (config.num_hidden_layers - 1)
                            / config.num_hidden_layers},  # layers up to Geneformer's default emb_layer -1, no head
    }
    tokens_per_s = perturbations * mean_length / ours["seconds"]
    figure["in_process"]["tokens_per_s"] = round(tokens_per_s)
    figure["in_process"]["achieved_gflops"] = round(tokens_per_s * figure["flops_per_token"]["ours"] / 1e9, 1)
    if not args.no_layouts:
        figure["in_process"]["layouts"] = layouts(ours, packed, model_dir, cell_ids, cells, workdir / f"other_{name}", mode=mode,
                                                  device=args.accelerator, precision="fp32", batch_size=args.batch_size)
    supported, why = bf16_support(args.accelerator)
    if supported and not args.no_bf16:
        packed = packed_copies("auto", args.accelerator, "bfloat16")
        half = in_process(model_dir, cell_ids, cells, workdir / f"bf16_{name}", mode=mode, device=args.accelerator,
                          precision="bf16", batch_size=args.batch_size, packing=packed)
        figure["bf16"] = {"seconds": round(half["seconds"], 1), "vs_peer": round(peer["seconds"] / half["seconds"], 2),
                          "vs_fp32": round(ours["seconds"] / half["seconds"], 2),
                          "agreement_with_peer_fp32": agreement(peer["cosines"], ours_cosines(half["shifts"], cell_ids))}
        if not args.no_layouts:
            figure["bf16"]["layouts"] = layouts(half, packed, model_dir, cell_ids, cells, workdir / f"bf16_other_{name}",
                                                mode=mode, device=args.accelerator, precision="bf16", batch_size=args.batch_size)
    else:
        figure["bf16"] = {"skipped": why if not supported else "--no-bf16"}
    return figure


def layouts(run: dict, packed: bool, model_dir: str, cell_ids, cells, out: Path, **options) -> dict:
    """The same in-process run with its sub-batches laid out the other way: packed rows (copies end to end,
    attention within each) against padded batches; ``packed`` says which one ``run`` used (auto's choice)."""
    other = in_process(model_dir, cell_ids, cells, out, packing=not packed, **options)
    seconds = {packed: run["seconds"], not packed: other["seconds"]}
    difference = agreement(ours_cosines(run["shifts"], cell_ids), ours_cosines(other["shifts"], cell_ids))
    return {"auto_packs": packed, "packed_seconds": round(seconds[True], 2), "padded_seconds": round(seconds[False], 2),
            "packed_vs_padded": round(seconds[False] / seconds[True], 2),
            "max_abs_cosine_difference": difference["max_abs_cosine_difference"]}


def projection(figures: list[dict], device: str, workdir: Path) -> dict:
    """The cost of deleting every gene of 1,000 cells on V2-104M (PBMC3k's mean genes per cell under gc104M):
    measured rate on this device; GPU/NPU projected from FLOPs at an assumed utilisation of their bf16 peak."""
    from geneformer_ray.data.corpus import read_manifest
    from geneformer_ray.models.flavours import bert_config

    v2 = next((f for f in figures if f["model"] == "V2-104M"), None)
    config = bert_config("gf-12L-104M-i4096")
    corpus = workdir / "corpus_gc104M"
    manifest = read_manifest(corpus) if corpus.exists() else {"num_tokens": 898 * 2638, "num_cells": 2638}
    genes = round(manifest["num_tokens"] / manifest["num_cells"]) - 2  # PBMC3k's mean genes per cell under gc104M
    tokens = 1_000 * genes * (genes + 2)
    flops = tokens * flops_per_token(config, genes + 2, head=False) * 11 / 12
    result = {"work": f"delete every gene of 1,000 cells, V2-104M, cls mode, {genes} genes per cell (PBMC3k's mean)",
              "tokens": tokens, "flops": float(f"{flops:.3g}")}
    if v2:  # the measured per-FLOP rate of this device (shorter cells here: attention is a small share at 12 x 768)
        rate = v2["in_process"]["achieved_gflops"] * 1e9
        result[f"{device}_measured_rate_days"] = round(flops / rate / 86400, 1)
    for name, peak in PEAK_BF16.items():
        result[f"{name}_projected_hours"] = round(flops / (peak * ASSUMED_MFU) / 3600, 2)
    result["assumption"] = f"{ASSUMED_MFU:.0%} of the datasheet bf16 peak (BioNeMo reports ~32% for a 106M Geneformer on an A100)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cells", type=int, default=2, help="V1-10M: cells whose every gene is deleted")
    parser.add_argument("--max-genes", type=int, default=512, help="V1-10M: keep each cell's top genes (0: all)")
    parser.add_argument("--v2-cells", type=int, default=2)
    parser.add_argument("--v2-max-genes", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64, help="this system's sequences per forward pass")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--geneformer-src", default=None, help="a folder with Geneformer's package: run its code as the peer")
    parser.add_argument("--geneformer-python", default=sys.executable,
                        help="the interpreter with Geneformer's requirements (it needs transformers 4.x)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 figure (measured where the device has bf16 units)")
    parser.add_argument("--no-ray", action="store_true", help="only the in-process figures")
    parser.add_argument("--no-layouts", action="store_true", help="skip the packed vs padded sub-batch comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gf-perturb-bench"))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.geneformer_src and not (Path(args.geneformer_src) / "geneformer" / "in_silico_perturber.py").exists():
        sys.exit(f"--geneformer-src {args.geneformer_src}: no geneformer/in_silico_perturber.py there; pass the folder "
                 "that holds Geneformer's package (a clone of its repository)")
    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    figures = [measure(name, args, workdir) for name in args.models]
    result = {
        "figure": "delete every gene of each cell: this system vs Geneformer's procedure, same model, cells and machine",
        "device": args.accelerator, "results": figures, "projection_v2_104m_1000_cells": projection(figures, args.accelerator, workdir),
        "target": ">= 5x the peer on the same CPU, >= 10x on a GPU; Spearman >= 0.99 (fp32)",
        "seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if args.accelerator == "cuda" else ""),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
