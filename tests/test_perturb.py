"""Ring 2-3 of in-silico perturbation on real PBMC3k cells: shifts against an oracle that embeds the
perturbed encoding by hand (Geneformer's gene-mean cosine, ours, the state shifts), the gene network on two
actors, anchor pairs with filters, resuming after a killed driver."""

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

from geneformer_ray.data.corpus import read_columns
from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.infer.encoder import CellEncoder, select_cells
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.api import perturb
from geneformer_ray.infer.perturb_plan import ORIGINAL, perturb_encoding
from geneformer_ray.infer.perturb_stats import read_shifts

CPU = AcceleratorConfig(type="cpu")
CD74, LYZ = "ENSG00000019582", "ENSG00000090382"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_model(build_model("tiny", seed=0), tmp_path_factory.mktemp("models") / "tiny", vocab="gc30M")


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _cells(corpus, ids) -> dict[str, np.ndarray]:
    wanted = set(ids)
    return {cid: np.asarray(tokens) for shard in sorted(corpus.glob("part-*.parquet"))
            for cid, tokens in zip(*pq.read_table(shard, columns=["cell_id", "input_ids"]).to_pydict().values()) if cid in wanted}


def _gene_cosine(encoder, ids, new_ids, source, tokens):
    """Geneformer's shift by hand: the mean over the remaining genes of cos(state after, same gene's state before)."""
    before, _, _ = encoder.states([ids])
    after, _, _ = encoder.states([new_ids])
    keep = (source >= 0) & ~np.isin(new_ids, tokens)
    return cosine(after[0].numpy()[keep], before[0].numpy()[source[keep]]).mean()


def test_delete_matches_the_oracle_and_measures_the_shift_towards_goal_and_alternative(ray_session, pbmc3k_v1_corpus,
                                                                                        model, tmp_path, mlflow_server):
    out = tmp_path / "delete"
    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74", LYZ, "HLA-DRA"],
                      start_state="cell_type=B", goal_state="cell_type=CD14+ Mono", alt_states=["cell_type=NK"],
                      max_cells=10, max_state_cells=40, num_actors=2, cells_per_batch=3, accelerator=CPU,
                      tracking_uri=mlflow_server, progress=False).summary
    assert summary["cells"] == 10 and summary["cells_resumed"] == 0 and summary["metric"] == "shift_to_goal"
    assert summary["packed"] is False  # auto on a CPU: padded sub-batches
    shifts = read_shifts(out / "shifts")
    starts = select_cells(pbmc3k_v1_corpus, where=("cell_type", "B"), max_cells=10, seed=0)
    cells = _cells(pbmc3k_v1_corpus, starts)
    assert set(shifts["cell_id"]) == set(starts) and len(list((out / "shifts").glob("part-*.parquet"))) == 4

    encoder = CellEncoder(model, layer=-1)
    states = json.loads((out / "perturb.json").read_text())["state_embeddings"]
    centres = {}
    for label, value, n in (("start", "B", 40), ("goal", "CD14+ Mono", 40), ("alt1", "NK", 40)):
        members = _cells(pbmc3k_v1_corpus, select_cells(pbmc3k_v1_corpus, where=("cell_type", value), max_cells=n))
        centres[label] = np.mean([encoder.cell_embeddings([c])[0] for c in members.values()], 0)
        np.testing.assert_allclose(states[label]["embedding"], centres[label], atol=1e-5)
        assert states[label]["value"] == value and states[label]["cells"] == n

    token = {g: encoder.vocab.token_ids[g] for g in (CD74, LYZ)}
    # delete: only cells that express the gene; every row equals the oracle (the encoding with the token removed)
    for gene, tok in token.items():
        rows = shifts[(shifts["gene_token"] == tok) & (shifts["role"] == "gene")]
        assert set(rows["cell_id"]) == {c for c, ids in cells.items() if tok in ids}
    rows = shifts[shifts["gene_token"].isin(token.values()) & (shifts["role"] == "gene")]
    assert len(rows) >= 10
    for _, row in rows.iterrows():
        ids = cells[row["cell_id"]]
        original = encoder.cell_embeddings([ids])[0]
        new_ids, source = perturb_encoding(ids, (row["gene_token"],), "delete", cls_id=None, eos_id=None, max_genes=2048)
        deleted = encoder.cell_embeddings([new_ids])[0]
        assert row["shift"] == pytest.approx(1 - _gene_cosine(encoder, ids, new_ids, source, [row["gene_token"]]), abs=2e-6)
        assert row["cell_shift"] == pytest.approx(1 - cosine(original, deleted), abs=2e-6)
        for label, centre in centres.items():
            assert row[f"shift_to_{label}"] == pytest.approx(cosine(deleted, centre) - cosine(original, centre), abs=2e-6)
    assert rows["shift"].max() > 1e-5  # an untrained model still moves
    # the null: 5 random genes of each cell, none of them a target; the originals record the cell's cosine to each state
    null = shifts[shifts["role"] == "null"]
    assert (null.groupby("cell_id").size() == 5).all() and not null["gene_token"].isin(token.values()).any()
    originals = shifts[shifts["gene_token"] == ORIGINAL].set_index("cell_id")
    first = starts[0]
    assert originals.loc[first, "shift_to_goal"] == pytest.approx(
        cosine(encoder.cell_embeddings([cells[first]])[0], centres["goal"]), abs=1e-6)

    stats = pd.read_csv(out / "gene_stats.csv")  # Geneformer's goal_state_shift against the null rows
    assert "CD74" in set(stats["symbol"]) and set(stats["symbol"]) <= {"CD74", "LYZ", "HLA-DRA"}
    assert {"cells", "mean_shift_to_goal", "mean_shift_to_alt1", "p_value", "fdr", "fdr_alt1", "significant"} <= set(stats.columns)
    assert stats.loc[stats["symbol"] == "CD74", "cells"].item() == rows[rows["gene_token"] == token[CD74]].shape[0]
    assert (out / "shift_vs_significance.png").stat().st_size > 10_000
    client = mlflow.MlflowClient(mlflow_server)
    assert {"gene_stats.csv", "shift_vs_significance.png", "summary.json", "perturb.json"} <= \
        {f.path for f in client.list_artifacts(summary["mlflow_run_id"])}


def test_every_gene_deleted_on_two_actors_with_the_gene_network(ray_session, pbmc3k_v1_corpus, model, tmp_path):
    """Cell-and-gene mode over 4 cells on 2 actors: each cell in exactly one part (none done twice), the
    gene table holds every (perturbed, affected) pair of each cell, its aggregate and heatmap, the mixture model."""
    out = tmp_path / "network"
    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="delete", all_genes=True, emb_mode="cell_and_gene",
                      max_cells=4, seed=4, num_actors=2, cells_per_batch=1, accelerator=CPU, progress=False).summary
    cells = _cells(pbmc3k_v1_corpus, select_cells(pbmc3k_v1_corpus, max_cells=4, seed=4))
    parts = sorted((out / "shifts").glob("part-*.parquet"))
    owners = [set(pq.read_table(p, columns=["cell_id"]).column(0).to_pylist()) for p in parts]
    assert len(parts) == 4 and sorted(c for o in owners for c in o) == sorted(cells) and all(len(o) == 1 for o in owners)
    shifts = read_shifts(out / "shifts")
    genes = shifts[shifts["role"] == "gene"]
    assert summary["perturbations"] == len(genes) == sum(len(ids) for ids in cells.values())
    network = pq.ParquetFile(next((out / "gene_shifts").glob("part-*.parquet")))
    assert network.metadata.num_row_groups >= 2  # written a sub-batch at a time
    total = sum(pq.read_metadata(p).num_rows for p in (out / "gene_shifts").glob("part-*.parquet"))
    assert total == sum(len(ids) * (len(ids) - 1) for ids in cells.values())
    pairs = pd.read_parquet(out / "gene_pair_shifts.parquet")
    assert pairs["cells"].sum() == total and pairs["mean_shift"].between(-1, 2).all()
    one = pairs.iloc[0]
    raw = pq.read_table(out / "gene_shifts", filters=[("perturbed", "=", int(one["perturbed"])),
                                                     ("affected", "=", int(one["affected"]))]).to_pandas()
    assert len(raw) == one["cells"] and one["mean_cosine"] == pytest.approx(raw["cosine"].astype(float).mean(), abs=1e-9)
    assert (out / "gene_pair_heatmap.png").stat().st_size > 10_000
    mixture = pd.read_csv(out / "impact_mixture.csv")
    assert {"impactful", "impact_percent", "mean_shift"} <= set(mixture.columns) and len(mixture) > 100
    assert set(summary["tables"]) == {"gene_stats.csv", "impact_mixture.csv", "gene_pair_shifts.parquet"}


def test_anchor_pairs_inhibition_filters_and_positions(ray_session, pbmc3k_v1_corpus, model, tmp_path):
    """Inhibit CD74 with each listed gene in the first cells (by position) of two cell types: the anchor alone,
    each gene alone and the pair per cell, equal to the oracle (sub-batches packed, as on CUDA / NPU in bf16);
    the combination statistics; refusals."""
    out = tmp_path / "anchor"
    listed = ["HLA-DRA", "HLA-DRB1", LYZ, "CD79A", "MS4A1", "S100A9", "TYROBP", "FTL", "FTH1", "B2M", "TMSB4X", "CST3"]
    summary = perturb(model, pbmc3k_v1_corpus, out, perturbation="inhibit", quartiles=2, genes=listed, anchor="CD74",
                      filters=["cell_type=B,CD14+ Mono"], cell_range="0:6", num_actors=1, accelerator=CPU, packing="on",
                      progress=False).summary
    assert summary["packed"] is True
    everyone = read_columns(pbmc3k_v1_corpus, ["cell_id", "cell_type"]).to_pandas()
    chosen = everyone[everyone["cell_type"].isin(["B", "CD14+ Mono"])]["cell_id"].tolist()[:6]
    shifts = read_shifts(out / "shifts")
    assert sorted(set(shifts["cell_id"])) == sorted(chosen)
    cells = _cells(pbmc3k_v1_corpus, chosen)
    encoder = CellEncoder(model, layer=-1)
    anchor = encoder.vocab.token_ids[CD74]
    combo = shifts[shifts["role"] == "combo"].iloc[0]
    ids = cells[combo["cell_id"]]
    rank = {t: i for i, t in enumerate(ids.tolist())}
    assert tuple(combo["perturbed"]) == tuple(sorted((anchor, combo["gene_token"]), key=rank.get))
    for _, row in shifts[(shifts["cell_id"] == combo["cell_id"]) & (shifts["role"] != "original")].iterrows():
        new_ids, source = perturb_encoding(ids, tuple(row["perturbed"]), "inhibit", cls_id=None, eos_id=None, max_genes=2048,
                                           quartiles=2)  # every copy of this cell: anchor, genes, pairs, nulls
        assert row["shift"] == pytest.approx(1 - _gene_cosine(encoder, ids, new_ids, source, row["perturbed"]), abs=2e-6)
    for cell_id, ids in cells.items():
        rows = shifts[shifts["cell_id"] == cell_id]
        if anchor in ids:
            assert (rows["role"] == "anchor").sum() == 1
            assert set(rows.loc[rows["role"] == "combo", "gene_token"]) == set(rows.loc[rows["role"] == "gene", "gene_token"])
        else:
            assert set(rows["role"]) == {"original"}
    combos = pd.read_csv(out / "impact_mixture.csv")
    assert {"anchor_shift", "gene_shift", "sum_of_shifts", "combo_shift", "combo_minus_sum"} <= set(combos.columns)
    with pytest.raises(ValueError, match=r"--anchor INS \(ENSG00000254647\) is in none of the 6 selected cells"):
        perturb(model, pbmc3k_v1_corpus, tmp_path / "none", perturbation="delete", genes=listed, anchor="INS",
                filters=["cell_type=B,CD14+ Mono"], cell_range="0:6", accelerator=CPU)
    with pytest.raises(ValueError, match=r"no cell of .* is selected by cell_type=\['B'\], --cell-range \[400, 500\]"):
        perturb(model, pbmc3k_v1_corpus, tmp_path / "none", perturbation="delete", all_genes=True,
                filters=["cell_type=B"], cell_range="400:500", accelerator=CPU)
    assert not (tmp_path / "none").exists()


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
