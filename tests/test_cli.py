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


def test_tokenize_command_on_local_ray(ray_session, tmp_path, capfd):
    out = tmp_path / "pbmc3k"
    rc = main(["tokenize", str(PBMC3K), "--vocab", "gc30M", "--out", str(out), "--obs", "cell_type",
               "--obs", "seurat_clusters=cluster", "--cells-per-shard", "1500", "--no-sum-duplicates", "--quiet"])
    assert rc == 0
    printed = capfd.readouterr().out
    assert "tokenized 2,638 of 2,638 cells" in printed and f"corpus: {out}" in printed
    assert printed.splitlines()[0] == f"log (Ray, workers, libraries): {out / 'tokenize.log'}"
    table = read_corpus_table(out)
    reference = pq.read_table(REFERENCE / "pbmc3k_V1.parquet")
    assert table["input_ids"].to_pylist() == reference["input_ids"].to_pylist()  # Geneformer V1 exactly
    assert table["cluster"].to_pylist() == reference["seurat_clusters"].to_pylist()
    assert len(read_manifest(out)["shards"]) == 2


def test_bad_input_is_one_clear_line(tmp_path, capfd):
    rc = main(["tokenize", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "out"), "--local"])
    err = capfd.readouterr().err
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


def test_quickstart_runs_the_main_job_on_bundled_data(ray_session, tmp_path, capfd):
    """The README's run command, shortened: tokenize the bundled PBMC3k (top 256 genes), pretrain tiny on 2
    workers from the gene frequencies, fine-tune it on the cell types next to logistic regression."""
    rc = main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "10", "--finetune-epochs", "1",
               "--set", "train.log_every=5"])
    assert rc == 0
    corpus = tmp_path / "qs" / "corpus"
    manifest = read_manifest(corpus)
    assert manifest["num_cells"] == 2638 and "cell_type" in manifest["columns"]
    assert manifest["settings"]["max_genes"] == 256 and max(pq.read_table(corpus / manifest["shards"][0]["path"],
                                                                         columns=["length"])["length"].to_pylist()) == 256
    shown = capfd.readouterr()
    printed = shown.out
    # one calm console: the log's path, then the summary block; bars on stderr; the rest in the log
    assert printed.splitlines()[0] == f"log (Ray, workers, libraries): {tmp_path / 'qs' / 'quickstart.log'}"
    assert len(printed.splitlines()) == 9 and len(set(printed.splitlines())) == 9
    assert all(f"{stage}: 100%" in shown.err for stage in ("tokenize", "pretrain", "fine-tune"))
    assert "step 10/10" not in shown.out + shown.err and (tmp_path / "qs" / "quickstart.log").exists()
    assert "pretraining: 10 steps, validation loss" in printed and "gene frequencies alone reach" in printed
    assert "fine-tuned on cell types: test macro-F1" in printed and "logistic regression on the same split" in printed \
        and "genes the model reads" in printed
    floors = json.loads((tmp_path / "qs" / "pretrain_tiny" / "floors.json").read_text())
    first = json.loads((tmp_path / "qs" / "pretrain_tiny" / "metrics.jsonl").read_text().splitlines()[0])
    # the head starts at the gene frequencies: the first steps' loss is near the unigram floor, not at log(vocab) ~10.1
    assert first["loss"] < floors["unigram"] + 0.5
    assert (tmp_path / "qs" / "pretrain_tiny" / "loss_curve.png").exists() and (tmp_path / "qs" / "mlflow.db").exists()
    assert (tmp_path / "qs" / "model" / "config.json").exists()
    assert list((tmp_path / "qs" / "finetune_cell_type").glob("checkpoint_*/model/config.json"))


def test_vocab_command_converts_pickled_dictionaries(tmp_path, capsys):
    from test_vocab import _geneformer_pickles
    from geneformer_ray.data.vocab import load_vocab

    folder = _geneformer_pickles(load_vocab("gc30M"), tmp_path / "gc30M")
    assert main(["vocab", str(folder), "--out", str(tmp_path / "safe")]) == 0
    assert load_vocab(tmp_path / "safe").sha256 == load_vocab("gc30M").sha256
    assert not list((tmp_path / "safe").glob("*.pkl"))
