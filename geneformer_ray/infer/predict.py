"""Batch inference of a fine-tuned model with Ray Data on a pool of model actors.

    geneformer-ray predict --model runs/finetune/finetune_cell_type/checkpoint_.../model --corpus corpus/ --out preds/

One actor per NPU / GPU (or CPU actors) loads the model once; Ray Data streams the corpus through
them, each batch sorted by length and padded per sub-batch. Cell and multitask classifiers write one
row per cell (cell id, predicted class, one probability per class; multitask: per task); gene
classifiers write one row per gene (cells it occurs in, mean probability per class, predicted
class). The output folder appears complete or not at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from geneformer_ray.data.corpus import read_corpus, read_manifest
from geneformer_ray.files import discard_output, finalize_output, prepare_output, write_json
from geneformer_ray.infer.config import PredictConfig
from geneformer_ray.infer.encoder import length_sorted_chunks
from geneformer_ray.models.folders import check_corpus_vocab, model_vocab, read_model_config
from geneformer_ray.models.tasks import model_class
from geneformer_ray.runtime import actor_device, actor_pool, actor_resources, autocast, pad_multiple, plan_actor_pool, tallied
from geneformer_ray.train.collate import pad_cells

KINDS = {"BertForSequenceClassification": "cell", "BertForTokenClassification": "gene",
         "BertForMultitaskCellClassification": "multitask"}


def model_kind(model_dir: str | Path) -> tuple[str, dict[str, list[str]]]:
    """The task kind of a saved fine-tuned model and its class names per head."""
    config = read_model_config(model_dir)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in KINDS:
        raise ValueError(f"--model {model_dir} is a {architecture}, not a fine-tuned classifier "
                         f"({', '.join(KINDS)}); fine-tune it first (geneformer-ray finetune)")
    kind = KINDS[architecture]
    if kind == "multitask":
        return kind, dict(config.task_classes)
    return kind, {"label": [config.id2label[i] for i in range(config.num_labels)]}


class Classifier:
    """A model actor for ``Dataset.map_batches``: loads the model once, predicts numpy batches."""

    def __init__(self, model_dir: str, plan: dict, pad_id: int, batch_size: int, tally=None):
        self.kind, self.heads = model_kind(model_dir)
        self.tally = tally
        self.plan, self.pad_id, self.batch_size = plan, pad_id, batch_size
        self.device = actor_device(plan)
        self.pad_multiple = pad_multiple(plan)
        self.model = model_class(self.kind).from_pretrained(model_dir, local_files_only=True).to(self.device).eval()
        self.special_ids = np.array(sorted(model_vocab(self.model.config).special_token_ids.values()))

    def __call__(self, batch: dict) -> dict:
        parts: list[dict] = []
        for rows in length_sorted_chunks(batch["length"], self.batch_size):
            input_ids, attention_mask = pad_cells([batch["input_ids"][i] for i in rows], pad_id=self.pad_id,
                                                  multiple=self.pad_multiple, max_width=self.model.config.max_position_embeddings)
            with torch.inference_mode(), autocast(self.plan, self.device):  # per call: actors run batches in threads
                outputs = self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                                     attention_mask=torch.from_numpy(attention_mask).to(self.device))
                parts.append(self._rows(outputs, batch["cell_id"][rows], input_ids))
        if self.tally is not None:
            self.tally.add.remote(len(batch["cell_id"]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _rows(self, outputs, cell_ids, input_ids) -> dict:
        if self.kind == "multitask":
            out = {"cell_id": np.asarray(cell_ids, dtype=object)}
            for head, names in self.heads.items():
                probs = torch.softmax(outputs[head].float(), -1).cpu().numpy()
                out[f"predicted_{head}"] = np.asarray(names, dtype=object)[probs.argmax(1)]
                out.update({f"prob_{head}_{n}": probs[:, i].astype(np.float32) for i, n in enumerate(names)})
            return out
        (names,) = self.heads.values()
        probs = torch.softmax(outputs.logits.float(), -1).cpu().numpy()
        if self.kind == "cell":
            return {"cell_id": np.asarray(cell_ids, dtype=object), "predicted": np.asarray(names, dtype=object)[probs.argmax(1)],
                    **{f"prob_{n}": probs[:, i].astype(np.float32) for i, n in enumerate(names)}}
        keep = ~np.isin(input_ids, self.special_ids)  # gene: per-token probabilities summed per gene in this sub-batch
        tokens, inverse = np.unique(input_ids[keep], return_inverse=True)
        sums = np.zeros((tokens.size, probs.shape[-1]))
        np.add.at(sums, inverse, probs[keep])
        return {"gene_token": tokens.astype(np.int64), "cells": np.bincount(inverse, minlength=tokens.size).astype(np.int64),
                **{f"sum_prob_{n}": sums[:, i] for i, n in enumerate(names)}}


def predict(cfg: PredictConfig) -> dict:
    """Predict every cell of the corpus with the fine-tuned model; returns a summary."""
    started = time.perf_counter()
    model_dir, corpus = cfg.model, cfg.corpus
    kind, heads = model_kind(model_dir)
    manifest = read_manifest(corpus)
    config = read_model_config(model_dir)
    check_corpus_vocab(config, manifest, corpus=corpus)
    vocab = model_vocab(config)
    plan, num_actors = plan_actor_pool(cfg.accelerator, cfg.num_actors)
    tmp = prepare_output(cfg.out, overwrite=cfg.overwrite)
    try:
        with tallied(total=manifest["num_cells"], desc="predict") as tally:
            rows = _predict_into(tmp, cfg, kind, heads, plan, num_actors, vocab, tally)
        if kind != "gene" and rows != manifest["num_cells"]:
            raise RuntimeError(f"predicted {rows:,} cells but the corpus has {manifest['num_cells']:,}")
        summary = {"model": model_dir, "corpus": corpus, "kind": kind,
                   "heads": heads, "rows": rows, "actors": num_actors, "device": plan.kind,
                   "seconds": round(time.perf_counter() - started, 1)}
        write_json(tmp / "summary.json", summary)
    except BaseException:
        discard_output(tmp)
        raise
    summary["out"] = str(finalize_output(tmp, cfg.out))
    return summary


def _predict_into(tmp: Path, cfg: PredictConfig, kind: str, heads: dict, plan, num_actors: int, vocab, tally) -> int:
    """The predictions written into ``tmp``; returns the rows written (cells, or genes)."""
    ds = read_corpus(cfg.corpus, columns=["input_ids", "length", "cell_id"]).map_batches(
        Classifier, fn_constructor_kwargs={"model_dir": cfg.model, "plan": plan.to_dict(), "pad_id": vocab.pad_id,
                                           "batch_size": cfg.batch_size, "tally": tally},
        batch_size=max(256, cfg.batch_size), batch_format="numpy", compute=actor_pool(num_actors), **actor_resources(plan))
    if kind == "gene":
        sums = ["cells"] + [f"sum_prob_{n}" for n in heads["label"]]
        per_gene = ds.groupby("gene_token").sum(sums).to_pandas()  # partial sums of every batch, added up
        table = _per_gene(per_gene.rename(columns={f"sum({c})": c for c in sums}), heads["label"], vocab)
        table.to_parquet(tmp / "gene_predictions.parquet", index=False)
        return len(table)
    ds.write_parquet(str(tmp / "predictions"))
    return sum(len(p) for p in _read_parts(tmp / "predictions"))


def _read_parts(folder: Path):
    return [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]


def _per_gene(grouped, names: list[str], vocab):
    """Mean probability per gene from the summed probabilities and cell counts."""
    genes = {t: g for g, t in vocab.token_ids.items()}
    table = pd.DataFrame({"gene": [genes.get(int(t), str(t)) for t in grouped["gene_token"]],
                          "gene_token": grouped["gene_token"].astype(np.int64), "cells": grouped["cells"].astype(np.int64)})
    probs = np.stack([grouped[f"sum_prob_{n}"] / grouped["cells"] for n in names], 1)
    for i, n in enumerate(names):
        table[f"prob_{n}"] = probs[:, i].astype(np.float32)
    table["predicted"] = np.asarray(names, dtype=object)[probs.argmax(1)]
    return table.sort_values("cells", ascending=False, ignore_index=True)
