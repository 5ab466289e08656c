"""In-silico perturbation throughput: this system (Ray Data actor pool, batched) vs the original approach
(one process, one cell at a time, one forward pass per perturbed cell), same model, cells and machine.

    geneformer-ray quickstart                              # the model and corpus perturbed here
    python benchmarks/perturb_bench.py [--cells 16] [--model runs/quickstart/model] [--flavour gf-6L-10M-i2048]
                                       [--accelerator cpu|cuda]

Work: delete every gene of each cell (``--all-genes``), cells sampled from PBMC3k (seeded). Figures in
perturbed cells (forward-passed perturbed encodings) per second:
  (a) ``geneformer_ray.perturb`` with 1 and with 2 model actors, end to end (actor start-up,
      Ray Data, writing the shift parts, the statistics);
  (b) the single-process loop: for each cell, embed it, then for each gene embed the encoding without it,
      one forward pass each; time-boxed (``--loop-seconds``), its rate from what it finished.
On CPU each actor gets one CPU (Ray sets one intra-op thread), and the loop runs with one thread too, so
(a, 1 actor)/(b) is the gain of batching alone and (a, 2 actors)/(a, 1 actor) the scaling.
With ``--flavour`` an untrained model of that size is built (speed does not depend on the weights).
With ``--max-genes N`` each cell keeps only its N top-ranked genes, in-process figures only (no Ray): a
diagnostic of where batching pays on a CPU (short encodings leave a forward pass overhead-bound, as one
cell per pass leaves a GPU), not a workload users run.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def loop_peer(model_dir: str, cells: list, *, seconds: float, device: str) -> dict:
    """The original approach: one cell at a time, one forward pass per perturbed encoding."""
    import numpy as np
    import torch

    from geneformer_ray.runtime import AcceleratorConfig, plan_accelerator
    from geneformer_ray.infer.encoder import CellEncoder
    from geneformer_ray.infer.perturb import cosine, perturbed_encoding

    if device == "cpu":
        torch.set_num_threads(1)
    plan = plan_accelerator(AcceleratorConfig(type=device), {"GPU": 1} if device == "cuda" else {}).to_dict()
    encoder = CellEncoder(model_dir, layer=-1, plan=plan)
    done, start = 0, time.perf_counter()
    for ids in cells:
        original = encoder.cell_embeddings([ids])[0]
        for token in ids:
            perturbed = encoder.cell_embeddings([perturbed_encoding(ids, int(token), "delete", cls_id=None, eos_id=None,
                                                                     max_genes=2048)])[0]
            1 - cosine(original, perturbed)
            done += 1
            if time.perf_counter() - start > seconds:
                break
        else:
            continue
        break
    elapsed = time.perf_counter() - start
    return {"perturbed_cells": done, "seconds": round(elapsed, 1), "cells_per_s": round(done / elapsed, 1),
            "threads": torch.get_num_threads() if device == "cpu" else None, "mean_length": float(np.mean([len(c) for c in cells]))}


def in_process(model_dir: str, table, out: Path, *, batch_size: int, device: str, cells_per_batch: int = 2) -> dict:
    """The system's model actor (``Perturber``) called in this process, batch after batch, without Ray:
    batching alone (on CPU with one thread, like the loop and like each Ray actor)."""
    import numpy as np
    import torch

    from geneformer_ray.runtime import AcceleratorConfig, plan_accelerator
    from geneformer_ray.infer.perturb import PerturbParams, Perturber

    if device == "cpu":
        torch.set_num_threads(1)
    plan = plan_accelerator(AcceleratorConfig(type=device), {"GPU": 1} if device == "cuda" else {}).to_dict()
    shutil.rmtree(out, ignore_errors=True)
    (out / "shifts").mkdir(parents=True)
    params = PerturbParams(model=model_dir, corpus="", perturbation="delete")
    actor = Perturber(model_dir, plan, params.__dict__, str(out), batch_size, None)
    batches = [{k: np.asarray(v, dtype=object) for k, v in table.slice(i, cells_per_batch).to_pydict().items()}
               for i in range(0, table.num_rows, cells_per_batch)]
    actor(batches[0])  # warm-up (CUDA context, kernels)
    done, start = 0, time.perf_counter()
    for batch in batches:
        done += int(actor(batch)["perturbations"][0])
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"perturbed_cells": done, "seconds": round(elapsed, 1), "cells_per_s": round(done / elapsed, 1)}


def system(model_dir: str, corpus: str, out: Path, *, cells: int, actors: int, batch_size: int, accelerator: str) -> dict:
    from geneformer_ray.runtime import AcceleratorConfig
    from geneformer_ray.api import perturb

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = perturb(model_dir, corpus, out, perturbation="delete", all_genes=True, max_cells=cells, num_actors=actors,
                      batch_size=batch_size, cells_per_batch=2, accelerator=AcceleratorConfig(type=accelerator), progress=False).summary
    elapsed = time.perf_counter() - start
    return {"actors": actors, "cells": summary["cells"], "perturbed_cells": summary["perturbations"],
            "seconds": round(elapsed, 1), "cells_per_s": round(summary["perturbations"] / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=16, help="cells perturbed by the system (every gene of each)")
    parser.add_argument("--model", default=str(REPO / "runs" / "quickstart" / "model"))
    parser.add_argument("--flavour", default=None, help="benchmark an untrained model of this size instead of --model")
    parser.add_argument("--corpus", default=str(REPO / "runs" / "quickstart" / "corpus"))
    parser.add_argument("--batch-size", type=int, default=64, help="perturbed encodings per forward pass (system)")
    parser.add_argument("--loop-seconds", type=float, default=60.0, help="time box of the one-at-a-time loop")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-ray", action="store_true", help="only the in-process figures (where Ray is not installed)")
    parser.add_argument("--max-genes", type=int, default=None,
                        help="diagnostic: keep each cell's N top-ranked genes (in-process figures only)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gf-perturb-bench"))
    args = parser.parse_args()
    if not Path(args.corpus).exists() or (args.flavour is None and not Path(args.model).exists()):
        sys.exit("run `geneformer-ray quickstart` first (or pass --model/--flavour and --corpus)")

    import torch

    from geneformer_ray.data.corpus import keep_top_genes
    from geneformer_ray.infer.encoder import read_cells, select_cells

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if args.flavour:
        from geneformer_ray.models.flavours import build_model
        from geneformer_ray.models.folders import save_model

        model_dir = str(save_model(build_model(args.flavour, seed=0), workdir / args.flavour, vocab="gc30M"))
    ids = select_cells(args.corpus, max_cells=args.cells, seed=0)
    table = read_cells(args.corpus, ids)
    if args.max_genes:
        table = keep_top_genes(table, args.max_genes)
    cells = [c.as_py() for c in table.column("input_ids")]

    peer = loop_peer(model_dir, [np.asarray(c, np.int64) for c in cells], seconds=args.loop_seconds, device=args.accelerator)
    batched = in_process(model_dir, table, workdir / "in_process", batch_size=args.batch_size, device=args.accelerator)
    runs = []
    if not args.no_ray and not args.max_genes:
        import ray

        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)  # GPUs: detected
        try:
            runs = [system(model_dir, args.corpus, workdir / f"run{n}", cells=args.cells, actors=n, batch_size=args.batch_size,
                           accelerator=args.accelerator) for n in ((1, 2) if args.accelerator == "cpu" else (1,))]
        finally:
            ray.shutdown()
    print(json.dumps({
        "figure": "perturbed cells per second (delete every gene of each cell)", "model": args.flavour or Path(model_dir).name,
        "device": args.accelerator, "cells": args.cells, "max_genes": args.max_genes, "mean_genes_per_cell": round(peer["mean_length"], 1),
        "batch_size": args.batch_size, "system": runs, "batched_in_process": batched, "loop_one_cell_one_pass": peer,
        "speedup_batching_alone": round(batched["cells_per_s"] / peer["cells_per_s"], 2),
        "speedup_1_actor_vs_loop": round(runs[0]["cells_per_s"] / peer["cells_per_s"], 2) if runs else None,
        "scaling_2_vs_1_actors": round(runs[1]["cells_per_s"] / runs[0]["cells_per_s"], 2) if len(runs) > 1 else None,
        "target": "(a)/(b) >= 5 from batching alone; near-linear in actors",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
    }))


if __name__ == "__main__":
    main()
