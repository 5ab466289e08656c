"""Ring 2-3 of embedding: `embed` on Ray Data actor pools over real PBMC cells, against hand computations;
the .h5ad copy, plots and MLflow run; bad input refused before any work."""

from __future__ import annotations

import anndata
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from geneformer_ray.runtime import AcceleratorConfig
from geneformer_ray.api import embed, perturb
from geneformer_ray.data.vocab import load_vocab
from geneformer_ray.infer.embed import read_embeddings
from geneformer_ray.infer.encoder import CellEncoder
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model

from conftest import PBMC_SMALL

CPU = AcceleratorConfig(type="cpu")


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory):
    """A seeded, untrained tiny model: cells still get distinct embeddings (and perturbations move them)."""
    return save_model(build_model("tiny", seed=0), tmp_path_factory.mktemp("models") / "tiny_v1", vocab="gc30M")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """A V2 (gc104M, <cls> ... <eos>) tiny model and the real pbmc_small tokenized for it."""
    from geneformer_ray.data.tokenize import tokenize

    folder = tmp_path_factory.mktemp("v2")
    tokenize([PBMC_SMALL], folder / "corpus", vocab="gc104M", executor="local", progress=False)
    model = save_model(build_model("tiny", "gc104M", seed=2), folder / "model", vocab="gc104M")
    return model, folder / "corpus"


def test_cell_embeddings_are_deterministic_and_land_in_h5ad_plots_and_mlflow(ray_session, pbmc3k_v1_corpus, v1_model,
                                                                               tmp_path, mlflow_server):
    common = dict(max_cells=120, seed=1, accelerator=CPU)
    one = embed(v1_model, pbmc3k_v1_corpus, tmp_path / "one", num_actors=1, h5ad=True, color=["cell_type", "n_counts"],
                heatmap_by="cell_type", tracking_uri=mlflow_server, **common).summary
    two = embed(v1_model, pbmc3k_v1_corpus, tmp_path / "two", num_actors=2, **common).summary
    assert one["cells"] == two["cells"] == 120 and (one["actors"], two["actors"]) == (1, 2)
    a, b = (read_embeddings(tmp_path / name / "embeddings", ["cell_id", "cell_type"]) for name in ("one", "two"))
    assert list(a["cell_id"]) == list(b["cell_id"])
    # another run on twice the actors: equal up to float summation order (kernels are picked by batch shape)
    np.testing.assert_allclose(a.attrs["embedding"], b.attrs["embedding"], rtol=0, atol=1e-6)
    assert np.abs(a.attrs["embedding"]).mean() > 0.1 and np.unique(a.attrs["embedding"][:, 0]).size > 100

    # the parquet carries the corpus' metadata and a plain list<float32> embedding
    schema = pq.read_schema(next((tmp_path / "one" / "embeddings").glob("*.parquet")))
    assert {"cell_id", "cell_type", "length", "n_counts"} <= set(schema.names)
    kind = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 64 and kind.value_type == pa.float32()

    # each cell's row is what the encoder gives that cell alone (no padding, no neighbours)
    encoder = CellEncoder(v1_model, layer=-1)
    cells = pq.read_table(pbmc3k_v1_corpus / "part-00000.parquet", columns=["cell_id", "input_ids"]).to_pandas()
    picked = a[a["cell_id"].isin(set(cells["cell_id"]))].head(3)
    for i, row in picked.iterrows():
        tokens = cells.loc[cells["cell_id"] == row["cell_id"], "input_ids"].iloc[0]
        np.testing.assert_allclose(a.attrs["embedding"][i], encoder.cell_embeddings([np.asarray(tokens)])[0], atol=1e-6)

    # .h5ad: the whole input file, embeddings in its own cell order, NaN for cells not embedded, parameters in uns
    adata = anndata.read_h5ad(one["h5ad"])
    assert adata.n_obs == 2638 and adata.obsm["X_geneformer"].shape == (2638, 64)
    matrix = adata.obsm["X_geneformer"]
    embedded = ~np.isnan(matrix).any(1)
    assert embedded.sum() == 120
    position = {name: i for i, name in enumerate(adata.obs_names)}
    rows = [position[cell] for cell in a["cell_id"]]
    np.testing.assert_array_equal(matrix[rows], a.attrs["embedding"])
    assert adata.uns["geneformer"]["params"]["layer"] == -1 and adata.uns["geneformer"]["params"]["mode"] == "mean"

    # plots, and the MLflow run that holds them
    names = {p.rsplit("/", 1)[-1] for p in one["plots"]}
    assert names == {"umap_cell_type.png", "umap_n_counts.png", "heatmap_cell_type.png"}
    assert all((tmp_path / "one" / n).stat().st_size > 10_000 for n in names)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(one["mlflow_run_id"])
    assert run.data.params["layer"] == "-1" and run.data.metrics["cells"] == 120
    assert names | {"summary.json"} <= {f.path for f in client.list_artifacts(run.info.run_id)}


def test_gene_embeddings_are_the_mean_and_median_of_token_states(ray_session, pbmc3k_v1_corpus, v1_model, tmp_path):
    summary = embed(v1_model, pbmc3k_v1_corpus, tmp_path / "genes", mode="gene", max_cells=12, seed=5, num_actors=2,
                    accelerator=CPU).summary
    table = pq.read_table(tmp_path / "genes" / "gene_embeddings.parquet").to_pandas()
    assert summary["genes"] == len(table) > 1000 and table["cells"].max() <= 12
    # hand computation: each chosen cell alone through the encoder, the gene's token state collected
    from geneformer_ray.infer.encoder import select_cells

    chosen = set(select_cells(pbmc3k_v1_corpus, max_cells=12, seed=5))
    encoder = CellEncoder(v1_model, layer=-1)
    cells = [np.asarray(t) for shard in sorted(pbmc3k_v1_corpus.glob("part-*.parquet"))
             for cid, t in zip(*pq.read_table(shard, columns=["cell_id", "input_ids"]).to_pydict().values()) if cid in chosen]
    for _, gene in table.iloc[[0, len(table) // 2]].iterrows():
        states = []
        for cell in cells:
            if gene["gene_token"] in cell:
                hidden, _, _ = encoder.states([cell])
                states.append(hidden[0, int(np.flatnonzero(cell == gene["gene_token"])[0])].numpy())
        assert len(states) == gene["cells"]
        np.testing.assert_allclose(gene["mean"], np.mean(states, 0), atol=1e-5)
        np.testing.assert_allclose(gene["median"], np.median(states, 0), atol=1e-5)
    assert table.loc[0, "symbol"] and table.loc[0, "gene"].startswith("ENSG")


def test_v2_mean_excludes_cls_and_eos_and_cls_mode_reads_cls(ray_session, v2, tmp_path):
    model_dir, corpus = v2
    mean = embed(model_dir, corpus, tmp_path / "mean", layer=0, num_actors=2, accelerator=CPU).summary
    cls = embed(model_dir, corpus, tmp_path / "cls", mode="cls", layer=0, num_actors=1, accelerator=CPU).summary
    assert mean["cells"] == cls["cells"] == 80
    means = read_embeddings(tmp_path / "mean" / "embeddings")
    firsts = read_embeddings(tmp_path / "cls" / "embeddings")
    model = build_model("tiny", "gc104M", seed=2).eval()  # the same weights, the full model, by hand
    cells = pq.read_table(next(corpus.glob("part-*.parquet")), columns=["cell_id", "input_ids"]).to_pydict()
    for cell_id, tokens in list(zip(cells["cell_id"], cells["input_ids"]))[:4]:
        assert tokens[0] == 2 and tokens[-1] == 3  # <cls> genes <eos>
        with torch.no_grad():
            last = model.bert(input_ids=torch.tensor(tokens)[None]).last_hidden_state[0]
        i = list(means["cell_id"]).index(cell_id)
        np.testing.assert_allclose(means.attrs["embedding"][i], last[1:-1].mean(0).numpy(), atol=2e-6)
        np.testing.assert_allclose(firsts.attrs["embedding"][i], last[0].numpy(), atol=2e-6)


def test_bad_input_is_refused_before_any_work(pbmc3k_v1_corpus, v1_model, v2, tmp_path):
    v2_model, v2_corpus = v2
    out = tmp_path / "out"
    cases = [
        (lambda: embed(v1_model, v2_corpus, out), r"vocabulary"),
        (lambda: embed(v1_model, pbmc3k_v1_corpus, out, layer=2), r"--layer 2 is out of range for a 2-layer model"),
        (lambda: embed(v1_model, pbmc3k_v1_corpus, out, mode="cls"), r"--mode cls needs a V2 model"),
        (lambda: embed(v1_model, pbmc3k_v1_corpus, out, color=["donor"]), r"no column 'donor'.*--obs"),
        (lambda: embed(tmp_path, pbmc3k_v1_corpus, out), r"not a model folder"),
        (lambda: perturb(v2_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"]), r"vocabulary"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["NOTAGENE", "ENSG00000000000"]),
         r"'NOTAGENE' is unknown \(nearest: .*\); 'ENSG00000000000' has no token in the gc30M vocabulary"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=load_vocab("gc30M").gene_tokens[:2100],
                         group=True, max_cells=3), r"--group of 2100 genes is as large as the cells' encodings"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"], emb_mode="cls"),
         r"--emb-mode cls needs a V2 model"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"], filters=["cell_type=Neuron"]),
         r"--filter: no cell .* cell_type='Neuron'"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"],
                         start_state="cell_type=B", goal_state="cell_type=Neuron"), r"no cell .* cell_type='Neuron'.*'B'"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"], start_state="cell_type=B"),
         r"go together"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="delete", genes=["CD74"], layer=-3), r"out of range"),
        (lambda: perturb(v1_model, pbmc3k_v1_corpus, out, perturbation="shuffle", genes=["CD74"]), r"use delete, overexpress, inhibit, activate"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert not out.exists()  # nothing written


def test_embed_command_on_a_calm_console(ray_session, pbmc3k_v1_corpus, v1_model, tmp_path, capfd):
    """`geneformer-ray embed`: the log's path, one bar (fed by the model actors), the summary; Ray Data's
    notices in the log inside the output folder, kept when the folder is replaced; errors in one sentence."""
    from geneformer_ray.cli import main

    out = tmp_path / "emb"
    args = ["embed", "--model", str(v1_model), "--corpus", str(pbmc3k_v1_corpus), "--out", str(out), "--max-cells", "40",
            "--actors", "1", "--accelerator", "cpu"]
    assert main(args) == 0
    shown = capfd.readouterr()
    lines = shown.out.splitlines()
    assert lines[0] == f"log (Ray, workers, libraries): {out / 'embed.log'}" and len(lines) == 2
    assert lines[1].startswith("40 cells embedded (mean, layer -1) by 1 cpu actor(s)")
    bar = shown.err.replace("\r", "\n").strip().splitlines()
    assert bar[-1].startswith("embed: 100%") and "40/40" in bar[-1] and shown.err.count("\n") == 1  # one bar, redrawn
    assert (out / "embed.log").read_text().startswith("==== geneformer-ray embed, ") and (out / "summary.json").exists()

    assert main([*args, "--overwrite"]) == 0  # the folder is replaced: the log goes on in the new one
    capfd.readouterr()
    assert (out / "embed.log").read_text().count("==== geneformer-ray embed, ") == 2 and not list(tmp_path.glob(".emb*"))

    assert main([*args[:-6], "--out", str(tmp_path / "bad"), "--layer", "2"]) == 2
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "geneformer-ray embed: error: --layer 2 is out of range for a 2-layer model: use 0 (the last layer), -1 (the "
        "second to last, Geneformer's default) down to -2 (the input embeddings)",
        f"  the whole account: {tmp_path / 'bad' / 'embed.log'}"]
    assert "Traceback" in (tmp_path / "bad" / "embed.log").read_text()
