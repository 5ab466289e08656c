"""Ring 2: the distributed tokenize job on a local Ray: corpus folder, manifest, shards, Ray Data reader."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest

from geneformer_ray.data.corpus import check_vocab, read_corpus, read_manifest
from geneformer_ray.files import sha256_file
from geneformer_ray.data.encode import TokenizeOptions
from geneformer_ray.data.tokenize import tokenize
from geneformer_ray.data.vocab import load_vocab

from conftest import PBMC3K, PBMC_SMALL, REFERENCE, read_corpus_table


@pytest.fixture(scope="module")
def v2_corpus(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "pbmc3k_v2"
    manifest = tokenize([PBMC3K], out, vocab="gc104M", options=TokenizeOptions(obs_columns={"cell_type": "cell_type"}),
                        cells_per_shard=1000, progress=False)
    return out, manifest


def test_ray_job_writes_the_reference_tokens_in_shards(v2_corpus):
    out, manifest = v2_corpus
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet", "part-00001.parquet",
                                                   "part-00002.parquet", "summary.txt"]
    table = read_corpus_table(out)
    reference = pq.read_table(REFERENCE / "pbmc3k_V2.parquet")
    assert table["cell_id"].to_pylist() == reference["obs_name"].to_pylist()  # input cell order kept across shards
    assert table["input_ids"].to_pylist() == reference["input_ids"].to_pylist()
    assert table["cell_type"].to_pylist() == reference["cell_type"].to_pylist()
    assert table.schema.field("input_ids").type.value_type.bit_width == 32


def test_manifest_describes_the_corpus(v2_corpus):
    out, manifest = v2_corpus
    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(manifest))
    v2 = load_vocab("gc104M")
    assert on_disk["vocab"]["sha256"] == v2.sha256 and on_disk["vocab"]["name"] == "gc104M"
    assert on_disk["model_input_size"] == 4096
    assert on_disk["special_tokens"] == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert on_disk["num_cells"] == 2638 == sum(s["num_cells"] for s in on_disk["shards"])
    assert sum(on_disk["length_histogram"]["counts"]) == 2638
    assert set(on_disk["columns"]) == {"input_ids", "length", "cell_id", "cell_type", "pretrain_split"}
    source = on_disk["sources"][0]
    assert source["sha256"] == sha256_file(PBMC3K)
    assert source["genes"]["genes_total"] == 13714 and source["genes"]["duplicate_columns_summed"] > 0
    summary = on_disk["summary"]
    assert (summary["cells_in"], summary["cells_out"], summary["cells_no_vocab_gene"]) == (2638, 2638, 0)
    text = (out / "summary.txt").read_text()
    assert "2,638 of 2,638 cells" in text and "cell length" in text


def test_ray_data_reader_checks_the_vocabulary(v2_corpus, ray_session):
    out, _ = v2_corpus
    ds = read_corpus(out, vocab="gc104M", columns=["input_ids", "length"])
    assert ds.count() == 2638
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["input_ids"][0][0] == 2 and batch["input_ids"][0][-1] == 3
    with pytest.raises(ValueError, match="re-tokenize the data with --vocab gc30M"):
        check_vocab(read_manifest(out), "gc30M", corpus=out)


def test_seeded_shard_order_changes_every_epoch_and_repeats_for_the_seed(ray_session, tmp_path):
    tokenize([PBMC3K], tmp_path / "c", vocab="gc30M", cells_per_shard=200, executor="local", progress=False)
    shard_of = {}
    for i, path in enumerate(sorted((tmp_path / "c").glob("part-*.parquet"))):
        shard_of.update((cell, i) for cell in pq.read_table(path, columns=["cell_id"])["cell_id"].to_pylist())

    def shard_orders(ds, epochs=3):
        orders = []
        for _ in range(epochs):  # each iteration is one execution, as each training epoch is
            cells = [c for b in ds.iter_batches(batch_size=None, batch_format="numpy") for c in b["cell_id"]]
            assert sorted(cells) == sorted(shard_of)  # every cell once per epoch
            order = [shard_of[c] for c in cells]
            orders.append([s for j, s in enumerate(order) if j == 0 or order[j - 1] != s])
        return orders

    seeded = shard_orders(read_corpus(tmp_path / "c", columns=["cell_id"], shuffle_seed=5))
    assert len(seeded[0]) == 14 and sorted(seeded[0]) == list(range(14))  # whole shards, each once
    assert seeded[0] != seeded[1] != seeded[2] and seeded[0] != list(range(14))
    assert shard_orders(read_corpus(tmp_path / "c", columns=["cell_id"], shuffle_seed=5)) == seeded  # same seed: same epochs
    assert shard_orders(read_corpus(tmp_path / "c", columns=["cell_id"], shuffle_seed=6), 1)[0] != seeded[0]


def test_local_and_ray_executors_agree(v2_corpus, tmp_path):
    out, _ = v2_corpus
    tokenize([PBMC3K], tmp_path / "local", vocab="gc104M", options=TokenizeOptions(obs_columns={"cell_type": "cell_type"}),
             cells_per_shard=700, executor="local", progress=False)
    assert read_corpus_table(tmp_path / "local").equals(read_corpus_table(out))


def test_several_files_folders_and_globs_with_differing_column_types(ray_session, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    small = ad.read_h5ad(PBMC_SMALL)
    small.obs["batch"] = np.arange(80)  # integers here ...
    small.write_h5ad(folder / "a_small.h5ad")
    big = ad.read_h5ad(PBMC3K)[:500].copy()
    big.obs["batch"] = np.linspace(0.5, 1.5, 500)  # ... floats there: the corpus column becomes float
    big.write_h5ad(folder / "b_pbmc.h5ad")
    shutil.copy(PBMC_SMALL, tmp_path / "c_extra.h5ad")
    # c_extra has no "batch" column: an error that names the file, before anything is written
    with pytest.raises(ValueError, match="c_extra.h5ad: obs has no column 'batch'"):
        tokenize([folder, str(tmp_path / "c_*.h5ad")], tmp_path / "out", vocab="gc30M",
                 options=TokenizeOptions(obs_columns={"batch": "batch"}), progress=False)
    assert not (tmp_path / "out").exists()
    manifest = tokenize([folder], tmp_path / "out", vocab="gc30M", options=TokenizeOptions(obs_columns={"batch": "batch"}),
                        cells_per_shard=200, progress=False)
    assert manifest["num_cells"] == 580 and len(manifest["sources"]) == 2
    assert manifest["columns"]["batch"] == "double"
    table = read_corpus_table(tmp_path / "out")
    assert table["batch"].to_pylist()[:3] == [0.0, 1.0, 2.0]
    assert len({pq.read_schema(p).to_string() for p in (tmp_path / "out").glob("part-*.parquet")}) == 1


def test_every_obs_column_is_carried_by_default(tmp_path):
    small = ad.read_h5ad(PBMC_SMALL)
    small.obs["length"] = 1.0  # clashes with a corpus column: carried as obs_length
    small.write_h5ad(tmp_path / "a.h5ad")
    other = ad.read_h5ad(PBMC_SMALL)[:10].copy()
    other.obs = other.obs[["groups"]].assign(donor="d7")  # fewer columns, and one the first file lacks
    other.write_h5ad(tmp_path / "b.h5ad")
    manifest = tokenize([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "out", vocab="gc30M",
                        executor="local", progress=False)
    expected = ["input_ids", "length", "cell_id", *[c for c in small.obs.columns if c != "length"], "obs_length", "donor",
                "pretrain_split"]
    assert sorted(manifest["columns"]) == sorted(expected)
    table = read_corpus_table(tmp_path / "out")
    assert table["donor"].to_pylist() == [None] * 80 + ["d7"] * 10  # missing in a.h5ad: null there
    assert table["letter.idents"].to_pylist()[-10:] == [None] * 10
    assert table["groups"].to_pylist() == list(small.obs["groups"]) + list(other.obs["groups"])
    none = tokenize([tmp_path / "a.h5ad"], tmp_path / "bare", vocab="gc30M", options=TokenizeOptions(obs_columns={}),
                    executor="local", progress=False)
    assert sorted(none["columns"]) == ["cell_id", "input_ids", "length", "pretrain_split"]
