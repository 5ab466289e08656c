"""Exactly-once pretraining epochs and the split recorded at write time.

Ring 1: the plan and the reader on real PBMC3k shards (every training cell once, across a partial
epoch resumed on another number of ranks); the split in tokenize / convert / upgrade; refusals.
Ring 3: a real Ray cluster, a SIGKILLed worker, and a resume from 2 workers to 1, audited from the
cell numbers the loop recorded at every step (``train.cell_log``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geneformer_ray.data.corpus import MANIFEST, SPLIT_COLUMN, read_manifest, upgrade_corpus
from geneformer_ray.settings import load_config
from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.train.epoch_data import EpochData, plan_epoch
from geneformer_ray.train.schedule import lr_factor

TINY = "geneformer_ray/resources/configs/pretrain_tiny.yaml"


class OneRank:
    def gather(self, obj):
        return [obj]


def _train_cells(corpus) -> np.ndarray:
    manifest = read_manifest(corpus)
    out = []
    for s in manifest["shards"]:
        split = pq.read_table(Path(corpus) / s["path"], columns=[SPLIT_COLUMN])[SPLIT_COLUMN].cast(pa.string()).to_numpy(zero_copy_only=False)
        out.append(s["first_cell"] + np.flatnonzero(split == "train"))
    return np.concatenate(out)


# -- ring 1 ---------------------------------------------------------------------------------------
def test_plan_deals_every_remaining_training_cell_once_in_equal_shares(pbmc3k_v1_corpus):
    manifest = read_manifest(pbmc3k_v1_corpus)
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 8):
        consumed = np.zeros(manifest["num_cells"], dtype=bool)
        consumed[rng.choice(_train_cells(pbmc3k_v1_corpus), 500, replace=False)] = True
        plans = plan_epoch(manifest, consumed, seed=1, epoch=2, world=world)
        shares = [sum(seg.hi - seg.lo for seg in plan) for plan in plans]
        assert sum(shares) == manifest["split"]["num_train"] - 500 and max(shares) - min(shares) <= 1
        assert plans == plan_epoch(manifest, consumed, seed=1, epoch=2, world=world)  # every rank computes the same
        assert plans != plan_epoch(manifest, consumed, seed=1, epoch=3, world=world) or world == 1 and len(manifest["shards"]) == 1


def test_a_partial_epoch_resumed_on_fewer_ranks_reads_each_cell_once(pbmc3k_v1_corpus):
    manifest = read_manifest(pbmc3k_v1_corpus)
    data = EpochData(corpus=pbmc3k_v1_corpus, manifest=manifest, seed=0)
    batching = dict(pad_id=0, batch_size=None, max_tokens=8000, window_batches=8, shuffle_buffer=500)
    seen = []
    for rank in range(2):  # two ranks each train on their first 15 batches, then the run stops
        for i, batch in enumerate(data.rank_batches(rank, 2, **batching)):
            if i == 15:
                break
            assert batch["input_ids"].shape == batch["attention_mask"].shape
            data.consumed_by_step(batch["cell_index"])
            seen.append(batch["cell_index"])
    assert data.sync(OneRank()) == sum(map(len, seen))
    resumed = EpochData.restore(json.loads(json.dumps(data.state_dict(), default=lambda a: a.tolist())),
                                corpus=pbmc3k_v1_corpus, manifest=manifest, seed=0)
    assert resumed.epoch == 0 and np.array_equal(resumed.consumed, data.consumed)
    seen += [b["cell_index"] for b in resumed.rank_batches(0, 1, **batching)]  # one rank finishes the epoch
    cells = np.concatenate(seen)
    assert cells.size == np.unique(cells).size == manifest["split"]["num_train"]
    assert np.array_equal(np.sort(cells), _train_cells(pbmc3k_v1_corpus))
    with pytest.raises(RuntimeError, match="consumed twice"):
        resumed.consumed_by_step(cells[:3])
        resumed.consumed_by_step(cells[:1])
        resumed.sync(OneRank())


def test_split_recorded_at_write_time_and_upgraded_in_place(pbmc3k_subset_corpus, tmp_path):
    table = pq.read_table(Path(pbmc3k_subset_corpus) / "part-00000.parquet", columns=["cell_id", SPLIT_COLUMN])
    expected = np.array(["val" if zlib.crc32(c.encode()) < 0.02 * 2**32 else "train" for c in table["cell_id"].to_pylist()])
    assert np.array_equal(table[SPLIT_COLUMN].cast(pa.string()).to_numpy(zero_copy_only=False), expected)
    manifest = read_manifest(pbmc3k_subset_corpus)
    assert manifest["format_version"] == 2 and manifest["split"]["val_fraction"] == 0.02
    assert manifest["split"]["num_val"] == sum(s["num_val"] for s in manifest["shards"]) > 0

    # a corpus written before the split was recorded: pretraining refuses it and names the upgrade
    old = tmp_path / "old"
    old.mkdir()
    for s in manifest["shards"]:
        pq.write_table(pq.read_table(Path(pbmc3k_subset_corpus) / s["path"]).drop_columns([SPLIT_COLUMN]), old / s["path"])
    v1 = {k: v for k, v in manifest.items() if k != "split"} | {"format_version": 1}
    v1["shards"] = [{k: v for k, v in s.items() if k not in ("num_val", "first_cell")} for s in manifest["shards"]]
    (old / MANIFEST).write_text(json.dumps(v1))
    from geneformer_ray.train.pretrain import pretrain

    with pytest.raises(ValueError, match=rf"corpus format 1.*geneformer-ray upgrade-corpus {old} --val-fraction 0.02"):
        pretrain(load_config(PretrainConfig, TINY, [f"data.corpus={old}", f"train.storage_path={tmp_path}"]))
    upgraded = upgrade_corpus(old, val_fraction=0.02, progress=False)
    assert upgraded["split"] == manifest["split"] and sorted(p.name for p in old.glob("*.parquet")) == \
        sorted(s["path"] for s in upgraded["shards"])  # the old shards are gone, the new ones listed
    assert np.array_equal(_train_cells(old), _train_cells(pbmc3k_subset_corpus))  # the same cells held out as before

    # a config asking for another split than the corpus holds is refused with both values
    with pytest.raises(ValueError, match=r"data.val_fraction=0.1 but .* val_fraction 0.02 .*--val-fraction 0.1"):
        pretrain(load_config(PretrainConfig, TINY, [f"data.corpus={old}", f"train.storage_path={tmp_path}",
                                                    "data.val_fraction=0.1"]))


# -- ring 3 ---------------------------------------------------------------------------------------
def _config(corpus, storage, log, *extra):
    return load_config(PretrainConfig, TINY, [
        f"data.corpus={corpus}", f"train.storage_path={storage}", f"train.cell_log={log}", "data.batch_size=4",
        "data.shuffle_buffer=64", "train.log_every=4", "train.val_every=1000", "train.val_batches=2",
        "train.checkpoint_every=8", "optim.warmup_steps=4", "tracking.uri=none", "train.max_steps=null",
        "optim.lr=0.001", "optim.schedule=linear", "model.output_bias=zero", *extra])  # not the quickstart's settings


def _audit(log: Path, epoch: int = 0) -> np.ndarray:
    """The cells each step of ``epoch`` trained on, keeping for every step the attempt that the run kept
    (a resumed attempt redoes the steps after its checkpoint)."""
    kept: dict[int, dict] = {}
    for path in log.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] != epoch:
                continue
            step = kept.setdefault(record["step"], {})
            if record["attempt"] > step.get("attempt", -1):
                step.clear()
                step["attempt"] = record["attempt"]
            if record["attempt"] == step["attempt"]:
                step.setdefault("cells", []).extend(record["cells"])
    return np.array([c for s in kept.values() for c in s["cells"]], dtype=np.int64)


def test_killed_worker_mid_epoch_no_cell_repeated_or_skipped(ray_session, pbmc3k_subset_corpus, tmp_path):
    from faults import WorkerKiller

    from geneformer_ray.train.pretrain import pretrain

    storage, log = tmp_path / "runs", tmp_path / "cells"
    killer = WorkerKiller(storage / "once", checkpoints=3)  # two registered: the run is mid-epoch
    summary = pretrain(_config(pbmc3k_subset_corpus, storage, log, "train.run_name=once", "train.max_failures=2",
                               "train.epochs=1"))
    killer.join(timeout=5)
    assert killer.killed, "no training worker was found to kill"
    m = summary["metrics"]
    assert m["restarts"] == 1 and 8 <= m["resumed_from_step"] < m["step"] and m["epoch"] == 1
    cells = _audit(log)
    assert cells.size == np.unique(cells).size, "a cell of the epoch was trained on twice"
    assert np.array_equal(np.sort(cells), _train_cells(pbmc3k_subset_corpus)), "a training cell was skipped"
    attempts = {json.loads(line)["attempt"] for p in log.glob("rank-*.jsonl") for line in p.read_text().splitlines()}
    assert attempts == {0, 1}
    # the step count and the learning-rate schedule continue exactly across the restart
    windows = [json.loads(line) for line in Path(summary["metrics_file"]).read_text().splitlines() if '"lr"' in line]
    assert sorted({w["step"] for w in windows}) == list(range(4, m["step"] + 1, 4))
    assert all(w["lr"] == pytest.approx(0.001 * lr_factor(w["step"], schedule="linear", warmup_steps=4,
                                                          total_steps=m["total_steps"])) for w in windows)


def test_resume_on_fewer_workers_keeps_the_epoch_and_the_global_batch(ray_session, pbmc3k_subset_corpus, tmp_path):
    from geneformer_ray.train.pretrain import pretrain

    storage, log = tmp_path / "runs", tmp_path / "cells"
    first = pretrain(_config(pbmc3k_subset_corpus, storage, log, "train.run_name=shrink", "train.max_steps=12"))
    assert first["metrics"]["step"] == 12 and first["metrics"]["num_workers"] == 2
    second = pretrain(_config(pbmc3k_subset_corpus, storage, log, "train.run_name=shrink", "train.num_workers=1",
                              "train.epochs=1"))  # a server lost: one worker finishes the epoch
    m = second["metrics"]
    assert m["num_workers"] == 1 and m["grad_accum_steps"] == 2 and m["resumed_from_step"] == 12 and m["epoch"] == 1
    cells = _audit(log)
    assert cells.size == np.unique(cells).size == read_manifest(pbmc3k_subset_corpus)["split"]["num_train"]
    per_step = {}
    for path in log.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_step[record["step"]] = per_step.get(record["step"], 0) + len(record["cells"])
    # the global batch stays 2 x 4 cells (the last batch of a length-grouping window may be short)
    assert max(per_step.values()) == 8 and np.mean(list(per_step.values())) > 7
    assert sorted(per_step) == list(range(1, m["step"] + 1))
