"""Rings 2-3: the `geneformer-ray` command end to end on a local Ray, and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from geneformer_ray.cli import main
from geneformer_ray.data.corpus import read_manifest

from conftest import PBMC3K, PBMC_SMALL, REFERENCE, read_corpus_table


def test_tokenize_command_on_local_ray(ray_session, tmp_path, capsys):
    out = tmp_path / "pbmc3k"
    rc = main(["tokenize", str(PBMC3K), "--vocab", "gc30M", "--out", str(out), "--obs", "cell_type",
               "--obs", "seurat_clusters=cluster", "--cells-per-shard", "1500", "--no-sum-duplicates", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokenized 2,638 of 2,638 cells" in printed and f"corpus: {out}" in printed
    table = read_corpus_table(out)
    reference = pq.read_table(REFERENCE / "pbmc3k_V1.parquet")
    assert table["input_ids"].to_pylist() == reference["input_ids"].to_pylist()  # Geneformer V1 exactly
    assert table["cluster"].to_pylist() == reference["seurat_clusters"].to_pylist()
    assert len(read_manifest(out)["shards"]) == 2


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    rc = main(["tokenize", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "out"), "--local"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "geneformer-ray tokenize: error:" in err and "missing.h5ad does not exist" in err and "Traceback" not in err
    assert main(["tokenize", str(PBMC_SMALL), "--out", str(tmp_path / "o"), "--obs", "=x", "--local"]) == 2


def test_console_script_in_a_fresh_process(tmp_path):
    """The installed entry point, with its own Ray instance, as a user types it."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "small"
    proc = subprocess.run(["geneformer-ray", "tokenize", str(PBMC_SMALL), "--vocab", "gc104M", "--out", str(out),
                           "--obs", "RNA_snn_res.1=cluster", "--keep-counts"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenized 80 of 80 cells" in proc.stdout
    table = read_corpus_table(out)
    assert table.column_names == ["input_ids", "length", "cell_id", "counts", "cluster", "pretrain_split"]
    assert [len(c) for c in table["counts"].to_pylist()] == table["length"].to_pylist()
    described = subprocess.run([sys.executable, "-m", "geneformer_ray.cli", "vocab", "gc104M"],
                               capture_output=True, text=True, timeout=120)
    assert json.loads(described.stdout)["num_tokens"] == 20275


def test_quickstart_runs_the_main_job_on_bundled_data(ray_session, tmp_path, capsys):
    """The README's run command, shortened: tokenize the bundled PBMC3k, pretrain tiny on 2 workers."""
    rc = main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "10",
               "--set", "data.batch_size=4", "--set", "train.log_every=5"])
    assert rc == 0
    manifest = read_manifest(tmp_path / "qs" / "corpus")
    assert manifest["num_cells"] == 2638 and "cell_type" in manifest["columns"]
    printed = capsys.readouterr().out
    assert "done: 10 steps, loss" in printed and "model (Hugging Face folder):" in printed
    assert (tmp_path / "qs" / "pretrain_tiny" / "loss_curve.png").exists()
    assert (tmp_path / "qs" / "mlflow.db").exists()


def test_vocab_command_converts_pickled_dictionaries(tmp_path, capsys):
    from test_vocab import _geneformer_pickles
    from geneformer_ray.data.vocab import load_vocab

    folder = _geneformer_pickles(load_vocab("gc30M"), tmp_path / "gc30M")
    assert main(["vocab", str(folder), "--out", str(tmp_path / "safe")]) == 0
    assert load_vocab(tmp_path / "safe").sha256 == load_vocab("gc30M").sha256
    assert not list((tmp_path / "safe").glob("*.pkl"))
