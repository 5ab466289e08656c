"""Hyperparameter search: Optuna TPE + ASHA vs random search without early stopping, same budget, one run.

    geneformer-ray quickstart                       # the pretrained model and corpus the search starts from
    python benchmarks/hpo_bench.py [--trials 20] [--max-cells 1200] [--reduction-factor 4] [--model runs/quickstart/model]

Task: PBMC3k cell types (jobs/configs/finetune_cell_type.yaml) from the quickstart's model, 2 CPU workers per
trial, a fifth of the cells for validation. Both studies search the same space (learning rate, warmup, weight
decay, schedule, frozen layers, dropout, batch size, epochs) with the same seed and trial budget:
  (a) Optuna TPE (through Ray Tune's OptunaSearch) + ASHA, validating 4 times per epoch; ASHA's rungs come
      at 1, rf and rf^2 evaluations (``--reduction-factor`` rf, 4 by default: a quarter, one and four epochs);
  (b) Optuna's random sampler, every trial trained to its sampled number of epochs and validated at the end
      of each epoch (it needs no earlier evaluations, so it is not charged for them).
Prints one JSON line: per study the best validation macro-F1, the test macro-F1 of that trial's model,
the training epochs spent over all trials, trials stopped early and wall time; and the two targets:
(a) within 0.01 of (b)'s best macro-F1, with at most half of (b)'s epochs.
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
    "train.epochs": {"randint": [1, 4]},
}


def run_study(name: str, searcher: str, scheduler: str, args, workdir: Path) -> dict:
    import yaml

    from geneformer_ray.tune import load_study, tune_study

    study = {"study": {"finetune": str(REPO / "jobs" / "configs" / "finetune_cell_type.yaml"),
                       "finetune_set": [f"data.corpus={args.corpus}", f"model.init_from={args.model}",
                                        f"data.max_cells={args.max_cells}", "task.baseline=false", "split.val_fraction=0.2",
                                        f"train.evals_per_epoch={4 if scheduler == 'asha' else 1}",
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20, help="trial budget of each study")
    parser.add_argument("--max-cells", type=int, default=1200, help="PBMC3k cells used (seeded subsample)")
    parser.add_argument("--model", default=str(REPO / "runs" / "quickstart" / "model"))
    parser.add_argument("--corpus", default=str(REPO / "runs" / "quickstart" / "corpus"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduction-factor", type=int, default=4, help="ASHA: rungs at 1, rf, rf^2 evaluations; top 1/rf go on")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gf-hpo-bench"))
    args = parser.parse_args()
    for what, path in (("--model", args.model), ("--corpus", args.corpus)):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist; run `geneformer-ray quickstart` first (or pass {what})")

    import ray

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        a = run_study("tpe_asha", "tpe", "asha", args, workdir)
        b = run_study("random_full", "random", "none", args, workdir)
    finally:
        ray.shutdown()
    print(json.dumps({
        "task": "PBMC3k cell_type, quickstart model, 2 CPU workers per trial", "trials_each": args.trials,
        "max_cells": args.max_cells, "reduction_factor": args.reduction_factor, "tpe_asha": a, "random_no_early_stopping": b,
        "macro_f1_gap": round(a["best_val_macro_f1"] - b["best_val_macro_f1"], 4),
        "epochs_ratio": round(a["epochs_spent"] / b["epochs_spent"], 3) if b["epochs_spent"] else None,
        "target_met": bool(a["best_val_macro_f1"] >= b["best_val_macro_f1"] - 0.01
                           and a["epochs_spent"] <= 0.5 * b["epochs_spent"]),
    }))


if __name__ == "__main__":
    main()
