"""Ring 1: Geneformer save_to_disk datasets -> corpus folders, streamed record batch by record batch."""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geneformer_ray.data.convert import _dataset_arrow_files, _ipc_rows, convert_hf_dataset
from geneformer_ray.data.corpus import keep_top_genes, read_manifest
from geneformer_ray.data.vocab import load_vocab

from conftest import REFERENCE, read_corpus_table


def _save(table: pa.Table, path, num_shards=1):
    ds = datasets.Dataset(table)
    ds.save_to_disk(str(path), num_shards=num_shards)
    return path


@pytest.fixture(scope="module")
def reference():
    return {v: pq.read_table(REFERENCE / f"pbmc3k_{v}.parquet").drop_columns(["cell_index"]) for v in ("V1", "V2")}


@pytest.mark.parametrize("version, expected_vocab", [("V1", "gc30M"), ("V2", "gc104M")])
def test_vocabulary_is_inferred_and_rows_kept(reference, tmp_path, version, expected_vocab):
    dataset = _save(reference[version], tmp_path / f"{version}.dataset", num_shards=3)
    assert len(_dataset_arrow_files(dataset)) == 3
    manifest = convert_hf_dataset(dataset, tmp_path / "corpus", cells_per_shard=1000, progress=False)
    assert manifest["vocab"]["sha256"] == load_vocab(expected_vocab).sha256
    assert [s["num_cells"] for s in manifest["shards"]] == [1000, 1000, 638]
    table = read_corpus_table(tmp_path / "corpus")
    assert table["input_ids"].to_pylist() == reference[version]["input_ids"].to_pylist()
    assert table["obs_name"].to_pylist() == reference[version]["obs_name"].to_pylist()
    assert table["cell_id"].to_pylist()[:2] == [f"{version}.dataset:0", f"{version}.dataset:1"]
    assert read_manifest(tmp_path / "corpus")["num_cells"] == 2638


def test_streams_record_batches_of_a_large_arrow_file(reference, tmp_path):
    """The dataset is read one record batch at a time: many batches in, shards rolled over by size."""
    dataset = _save(reference["V1"], tmp_path / "one.dataset")
    arrow = _dataset_arrow_files(dataset)[0]
    with pa.memory_map(str(arrow)) as source:
        batches = sum(1 for _ in pa.ipc.open_stream(source))
    assert batches >= 3 and _ipc_rows(arrow) == 2638
    manifest = convert_hf_dataset(dataset, tmp_path / "corpus", cells_per_shard=600, progress=False)
    assert len(manifest["shards"]) == 5


def test_ambiguous_tokens_need_an_explicit_vocabulary(tmp_path):
    table = pa.table({"input_ids": pa.array([[5, 6, 7], [8, 9]], pa.list_(pa.int64())), "length": [3, 2]})
    dataset = _save(table, tmp_path / "small.dataset")
    with pytest.raises(ValueError, match="cannot tell the vocabulary.*pass --vocab"):
        convert_hf_dataset(dataset, tmp_path / "corpus", progress=False)
    assert not (tmp_path / "corpus").exists()
    manifest = convert_hf_dataset(dataset, tmp_path / "corpus", vocab="gc30M", progress=False)
    assert manifest["num_cells"] == 2
    assert read_corpus_table(tmp_path / "corpus").schema.field("input_ids").type == pa.list_(pa.int32())


def test_tokens_outside_the_given_vocabulary(tmp_path, reference):
    dataset = _save(reference["V1"], tmp_path / "v1.dataset")
    with pytest.raises(ValueError, match="token ids range .* vocabulary gc104M has 20275; pass the matching --vocab"):
        convert_hf_dataset(dataset, tmp_path / "corpus", vocab="gc104M", progress=False)
    assert not (tmp_path / "corpus").exists()


def test_inconsistent_length_column(tmp_path):
    table = pa.table({"input_ids": pa.array([[2, 50, 3]], pa.list_(pa.int32())), "length": [7]})
    with pytest.raises(ValueError, match="'length' column that disagrees"):
        convert_hf_dataset(_save(table, tmp_path / "bad.dataset"), tmp_path / "corpus", progress=False)


def test_dataset_dict_and_non_datasets(tmp_path, reference):
    dd = datasets.DatasetDict({"train": datasets.Dataset(reference["V2"].slice(0, 10)),
                               "test": datasets.Dataset(reference["V2"].slice(10, 5))})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict with splits .*convert one split folder"):
        convert_hf_dataset(tmp_path / "dd", tmp_path / "corpus", progress=False)
    manifest = convert_hf_dataset(tmp_path / "dd" / "train", tmp_path / "corpus", progress=False)
    assert manifest["num_cells"] == 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .arrow files"):
        convert_hf_dataset(tmp_path / "empty", tmp_path / "corpus2", progress=False)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        convert_hf_dataset(_save(pa.table({"x": [1]}), tmp_path / "x.dataset"), tmp_path / "corpus3", vocab="gc30M", progress=False)


def test_keep_top_genes_cuts_each_cell_to_its_first_ranked_genes(reference):
    table = reference["V1"]
    cut = keep_top_genes(table, 256)
    assert cut.schema == table.schema and cut.num_rows == table.num_rows
    assert cut["input_ids"].to_pylist() == [ids[:256] for ids in table["input_ids"].to_pylist()]
    assert cut["length"].to_pylist() == [min(n, 256) for n in table["length"].to_pylist()]
    assert max(table["length"].to_pylist()) > 256 > min(table["length"].to_pylist())  # both cases are in the data
    assert cut["cell_type"].to_pylist() == table["cell_type"].to_pylist()
