"""Ring 2-3 of in-silico perturbation on real PBMC3k cells: shifts against an oracle that embeds the
perturbed encoding by hand, the goal state, --all-genes with its null, resuming after a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.infer.encoder import CellEncoder, select_cells
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.api import perturb
from geneformer_ray.infer.perturb import cosine, perturbed_encoding
from geneformer_ray.infer.perturb_stats import ORIGINAL, read_shifts

CPU = AcceleratorConfig(type="cpu")
CD74, LYZ = "ENSG00000019582", "ENSG00000090382"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_model(build_model("tiny", seed=0), tmp_path_factory.mktemp("models") / "tiny", vocab="gc30M")


def _cells(corpus, ids) -> dict[str, np.ndarray]:
    wanted = set(ids)
    return {cid: np.asarray(tokens) for shard in sorted(corpus.glob("part-*.parquet"))
            for cid, tokens in zip(*pq.read_table(shard, columns=["cell_id", "input_ids"]).to_pydict().values()) if cid in wanted}


def test_delete_matches_the_oracle_and_measures_the_shift_towards_the_goal(ray_session, pbmc3k_v1_corpus, model, tmp_path,
                                                                          mlflow_server):
    out = tmp_path / "delete"
    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74", LYZ, "HLA-DRA", "NOTAGENE"],
                      start_state="cell_type=B", goal_state="cell_type=CD14+ Mono", max_cells=10, max_state_cells=40,
                      num_actors=2, cells_per_batch=3, accelerator=CPU, tracking_uri=mlflow_server, progress=False).summary
    assert summary["cells"] == 10 and summary["genes_not_in_vocab"] == ["NOTAGENE"] and summary["cells_resumed"] == 0
    shifts = read_shifts(out / "shifts")
    starts = select_cells(pbmc3k_v1_corpus, where=("cell_type", "B"), max_cells=10, seed=0)
    cells = _cells(pbmc3k_v1_corpus, starts)
    assert set(shifts["cell_id"]) == set(starts) and len(list((out / "shifts").glob("part-*.parquet"))) == 4

    encoder = CellEncoder(model, layer=-1)
    goal_cells = _cells(pbmc3k_v1_corpus, select_cells(pbmc3k_v1_corpus, where=("cell_type", "CD14+ Mono"), max_cells=40))
    goal = np.mean([encoder.cell_embeddings([c])[0] for c in goal_cells.values()], 0)
    saved_goal = np.array(json.loads((out / "perturb.json").read_text())["goal_embedding"])
    np.testing.assert_allclose(saved_goal, goal, atol=1e-5)

    token = {g: encoder.vocab.token_ids[g] for g in (CD74, LYZ)}
    # delete: only cells that express the gene; every row equals the oracle (the encoding with the token removed)
    for gene, tok in token.items():
        rows = shifts[(shifts["gene_token"] == tok) & ~shifts["is_null"]]
        assert set(rows["cell_id"]) == {c for c, ids in cells.items() if tok in ids}
    rows = shifts[shifts["gene_token"].isin(token.values()) & ~shifts["is_null"]]
    assert len(rows) >= 10
    for _, row in rows.iterrows():
        ids = cells[row["cell_id"]]
        original = encoder.cell_embeddings([ids])[0]
        deleted = encoder.cell_embeddings([ids[ids != row["gene_token"]]])[0]
        assert row["shift"] == pytest.approx(1 - cosine(original, deleted), abs=2e-6)
        assert row["goal_shift"] == pytest.approx(cosine(deleted, goal) - cosine(original, goal), abs=2e-6)
    assert rows["shift"].max() > 1e-5  # an untrained model still moves
    # the null: 5 random genes of each cell, none of them a target; the originals record the cell's cosine to the goal
    null = shifts[shifts["is_null"]]
    assert (null.groupby("cell_id").size() == 5).all() and not null["gene_token"].isin(token.values()).any()
    originals = shifts[shifts["gene_token"] == ORIGINAL].set_index("cell_id")
    first = starts[0]
    assert originals.loc[first, "goal_shift"] == pytest.approx(cosine(encoder.cell_embeddings([cells[first]])[0], goal), abs=1e-6)

    stats = pd.read_csv(out / "gene_stats.csv")
    assert "CD74" in set(stats["symbol"]) and set(stats["symbol"]) <= {"CD74", "LYZ", "HLA-DRA"}
    assert {"cells", "mean_goal_shift", "mean_shift", "p_value", "fdr"} <= set(stats.columns)
    assert stats.loc[stats["symbol"] == "CD74", "cells"].item() == rows[rows["gene_token"] == token[CD74]].shape[0]
    assert (out / "shift_vs_significance.png").stat().st_size > 10_000
    client = mlflow.MlflowClient(mlflow_server)
    assert {"gene_stats.csv", "shift_vs_significance.png", "summary.json", "perturb.json"} <= \
        {f.path for f in client.list_artifacts(summary["mlflow_run_id"])}


def test_overexpress_all_genes_with_the_null_drawn_from_the_cells_own_perturbations(ray_session, pbmc3k_v1_corpus, model,
                                                                                   tmp_path):
    out = tmp_path / "over"
    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="overexpress", all_genes=True, max_cells=2, seed=4,
                      num_actors=1, accelerator=CPU, progress=False).summary
    shifts = read_shifts(out / "shifts")
    cells = _cells(pbmc3k_v1_corpus, select_cells(pbmc3k_v1_corpus, max_cells=2, seed=4))
    genes = shifts[(shifts["gene_token"] != ORIGINAL) & ~shifts["is_null"]]
    assert summary["perturbations"] == len(genes) == sum(len(ids) for ids in cells.values())  # every gene of each cell
    encoder = CellEncoder(model, layer=-1)
    for _, row in genes.sample(4, random_state=0).iterrows():
        ids = cells[row["cell_id"]]
        moved = perturbed_encoding(ids, row["gene_token"], "overexpress", cls_id=None, eos_id=None, max_genes=2048)
        assert moved[0] == row["gene_token"] and len(moved) == len(ids)
        expected = 1 - cosine(encoder.cell_embeddings([ids])[0], encoder.cell_embeddings([moved])[0])
        assert row["shift"] == pytest.approx(expected, abs=2e-6)
    null = shifts[shifts["is_null"]].merge(genes, on=["cell_id", "gene_token"], suffixes=("_null", ""))
    assert len(null) == 10 and np.allclose(null["shift_null"], null["shift"])  # reused, not recomputed
    assert summary["genes_tested"] == 0  # each gene is in at most 2 cells: too few for a test


def test_a_killed_run_resumes_without_redoing_finished_cells(ray_session, pbmc3k_v1_corpus, model, tmp_path):
    import ray

    out = tmp_path / "resumable"
    args = ["--model", str(model), "--corpus", str(pbmc3k_v1_corpus), "--out", str(out), "--all-genes",
            "--perturbation", "delete", "--max-cells", "8", "--cells-per-batch", "2", "--actors", "1",
            "--accelerator", "cpu", "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "geneformer_ray.cli", "perturb", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list((out / "shifts").glob("part-*.parquet"))) < 1 and driver.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    time.sleep(5)  # Ray ends the dead driver's actors; a batch in flight may still land its part
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shifts").glob("part-*.parquet")}
    assert 1 <= len(before) < 4, "the driver should have been killed part-way"
    assert not (out / "gene_stats.csv").exists()

    other = ["overexpress" if a == "delete" else a for a in args]
    refused = subprocess.run([sys.executable, "-m", "geneformer_ray.cli", "perturb", *other], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "other parameters (perturbation)" in refused.stderr

    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="delete", all_genes=True, max_cells=8,
                      cells_per_batch=2, num_actors=1, accelerator=CPU, progress=False).summary
    assert summary["cells"] == 8 and summary["cells_resumed"] == 2 * len(before)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shifts").glob("part-*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished parts were not redone
    assert len(after) == 4
    shifts = read_shifts(out / "shifts")
    raw = sum(pq.read_metadata(p).num_rows for p in (out / "shifts").glob("part-*.parquet"))
    assert raw == len(shifts)  # no cell perturbed twice
    assert (out / "gene_stats.csv").exists() and summary["genes_tested"] > 50
