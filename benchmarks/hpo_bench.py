"""Hyperparameter search: Optuna TPE + ASHA vs random search without early stopping, same budget, one run.

    geneformer-ray quickstart                       # the pretrained model and corpus the search starts from
    python benchmarks/hpo_bench.py [--trials 20] [--epochs 5] [--reduction-factor 3] [--max-genes 256]

Task: PBMC3k cell types (jobs/configs/finetune_cell_type.yaml) from the quickstart's model, 2 CPU workers per
trial, every cell (60% train, 20% validation, 20% test). Both studies search the same space (learning rate,
warmup, weight decay, schedule, frozen layers, dropout, batch size) with the same seed and trial budget, and
validate once per epoch:
  (a) Optuna TPE (through Ray Tune's OptunaSearch; stopped trials told to Optuna as pruned) + ASHA, whose
      rungs come at 1, rf, rf^2 ... epochs (``--reduction-factor`` rf): at each rung only the best 1/rf go on;
  (b) Optuna's random sampler, every trial trained to the end.
The number of epochs is the resource ASHA hands out (its maximum, ``--epochs``, is the same for every trial),
not a searched hyperparameter: a searched epoch count lets the searcher buy quality with epochs, which is the
very cost being compared.

The quickstart's model (200 MLM steps on 2.6k cells) is weak: whatever the configuration, fine-tuning sits
on a plateau (one predicted class, validation macro-F1 ~0.05) for its first ~60-120 steps, so no early
decision can be better than chance before that point; ASHA's first rung is therefore one whole epoch. To
afford epochs on two CPU cores, cells are cut to their ``--max-genes`` top-ranked genes (the rank value
encoding puts each cell's most distinctive genes first; 0 keeps whole cells): one epoch is ~4x cheaper.

Prints one JSON line: per study the best validation macro-F1, the test macro-F1 of that trial's model, the
training epochs spent over all trials, trials stopped early and wall time; and the two targets: (a) within
0.01 of (b)'s best macro-F1, with at most half of (b)'s epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACE = {
    "optim.lr": {"loguniform": [1.0e-4, 2.0e-2]},
    "optim.warmup_steps": {"randint": [0, 40]},
    "optim.weight_decay": {"uniform": [0.0, 0.1]},
    "optim.schedule": {"choice": ["linear", "cosine"]},
    "model.freeze_layers": {"choice": [0, 1]},
    "model.hidden_dropout": {"uniform": [0.0, 0.2]},
    "data.batch_size": {"choice": [8, 16, 32]},
}


def run_study(name: str, searcher: str, scheduler: str, args, corpus: Path, workdir: Path) -> dict:
    import yaml

    from geneformer_ray.hpo.config import load_study
    from geneformer_ray.hpo.study import tune_study

    study = {"study": {"finetune": str(REPO / "jobs" / "configs" / "finetune_cell_type.yaml"),
                       "finetune_set": [f"data.corpus={corpus}", f"model.init_from={args.model}",
                                        *([f"data.max_cells={args.max_cells}"] if args.max_cells else []),
                                        "task.baseline=false", "split.val_fraction=0.2", f"train.epochs={args.epochs}",
                                        "train.evals_per_epoch=null", "train.eval_every=null",  # validate at each epoch's end
                                        "tracking.uri=none", "train.max_failures=0"],
                       "name": name, "storage_path": str(workdir), "num_trials": args.trials, "searcher": searcher,
                       "scheduler": scheduler, "seed": args.seed, "grace_period": 1, "reduction_factor": args.reduction_factor,
                       "max_concurrent_trials": 1},
             "space": SPACE}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    start = time.perf_counter()
    summary = tune_study(*load_study(path))
    seconds = time.perf_counter() - start
    best = summary.get("best") or {}
    record = Path(summary["study_dir"]) / "trial_records" / f"{best.get('trial_id')}.json"
    test_f1 = json.loads(record.read_text())["metrics"].get("test_macro_f1") if record.exists() else None
    return {"best_val_macro_f1": best.get("val_macro_f1"), "best_test_macro_f1": test_f1,
            "best_params": summary.get("best_params"), "epochs_spent": round(summary["epochs_spent"], 2),
            "trials": len(summary["trials"]), **{f"trials_{k}": v for k, v in summary["counts"].items()},
            "seconds": round(seconds, 1), "per_trial": [{k: r[k] for k in ("status", "val_macro_f1", "epochs_spent", "evaluations")}
                                                      for r in summary["trials"]]}


def cut_corpus(corpus: Path, out: Path, max_genes: int) -> Path:
    """A copy of ``corpus`` with every cell cut to its ``max_genes`` top-ranked genes (manifest updated)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from geneformer_ray.files import finalize_output, prepare_output, write_json
    from geneformer_ray.data.corpus import keep_top_genes, read_manifest
    from geneformer_ray.data.encode import length_histogram

    manifest = read_manifest(corpus)
    tmp = prepare_output(out, overwrite=True)
    lengths = []
    for shard in manifest["shards"]:
        table = keep_top_genes(pq.read_table(corpus / shard["path"]), max_genes)
        pq.write_table(table, tmp / shard["path"])
        lengths.append(table.column("length").to_numpy())
        shard.update(num_tokens=int(pc.sum(table.column("length")).as_py()), bytes=(tmp / shard["path"]).stat().st_size)
    lengths = np.concatenate(lengths)
    manifest.update(num_tokens=int(lengths.sum()),
                    length_histogram={**manifest["length_histogram"],
                                      "counts": length_histogram(lengths, manifest["model_input_size"]).tolist()})
    manifest["settings"]["max_genes"] = max_genes  # what this benchmark did to the corpus
    write_json(tmp / "manifest.json", manifest)
    return finalize_output(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20, help="trial budget of each study")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of a trial that is not stopped (ASHA's maximum)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA: rungs at 1, rf, rf^2 epochs; the best 1/rf go on")
    parser.add_argument("--max-genes", type=int, default=256, help="cut cells to their top-ranked genes (0: whole cells)")
    parser.add_argument("--max-cells", type=int, default=None, help="a seeded subsample of PBMC3k's 2,638 cells")
    parser.add_argument("--model", default=str(REPO / "runs" / "quickstart" / "model"))
    parser.add_argument("--corpus", default=str(REPO / "runs" / "quickstart" / "corpus"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gf-hpo-bench"))
    args = parser.parse_args()
    for what, path in (("--model", args.model), ("--corpus", args.corpus)):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist; run `geneformer-ray quickstart` first (or pass {what})")

    import ray

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    corpus = cut_corpus(Path(args.corpus), workdir / f"corpus_top{args.max_genes}", args.max_genes) if args.max_genes \
        else Path(args.corpus)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        a = run_study("tpe_asha", "tpe", "asha", args, corpus, workdir)
        b = run_study("random_full", "random", "none", args, corpus, workdir)
    finally:
        ray.shutdown()
    print(json.dumps({
        "task": "PBMC3k cell_type, quickstart model, 2 CPU workers per trial", "trials_each": args.trials,
        "epochs": args.epochs, "reduction_factor": args.reduction_factor, "max_genes": args.max_genes,
        "max_cells": args.max_cells, "tpe_asha": a, "random_no_early_stopping": b,
        "macro_f1_gap": round(a["best_val_macro_f1"] - b["best_val_macro_f1"], 4),
        "epochs_ratio": round(a["epochs_spent"] / b["epochs_spent"], 3) if b["epochs_spent"] else None,
        "target_met": bool(a["best_val_macro_f1"] >= b["best_val_macro_f1"] - 0.01
                           and a["epochs_spent"] <= 0.5 * b["epochs_spent"]),
    }))


if __name__ == "__main__":
    main()
