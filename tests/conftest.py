"""Shared fixtures: test data paths, a tiny hand-made vocabulary, one Ray instance per session."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_ray.cli import DEMO_DATA
from geneformer_ray.data.vocab import Vocabulary

TEST_DATA = Path(__file__).parent / "data"
PBMC3K = DEMO_DATA / "pbmc3k_counts.h5ad"
PBMC_SMALL = DEMO_DATA / "pbmc_small_counts.h5ad"
REFERENCE = TEST_DATA / "reference_tokens"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session: 4 logical CPUs on a 2-core box."""
    import ray

    # the dashboard serves the State API Ray Train's placement-group cleaner needs (stopped Tune trials)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` process on loopback."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server_artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def free_port() -> int:
    """A free TCP port on loopback (for servers and heads started by tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forget_ray_address(port: int) -> None:
    """A cluster started by a test records its address for later `ray.init()` calls: remove it once that
    cluster is gone, so no later test joins a dead one."""
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.fixture(scope="session")
def pbmc3k_v1_corpus(tmp_path_factory):
    """The real PBMC3k tokenized with gc30M (3 shards, every obs column): shared by the training tests."""
    from geneformer_ray.data.tokenize import tokenize

    out = tmp_path_factory.mktemp("pbmc3k_v1") / "corpus"
    tokenize([PBMC3K], out, vocab="gc30M", cells_per_shard=1000, executor="local", progress=False)
    return out


@pytest.fixture(scope="session")
def pbmc3k_subset_corpus(tmp_path_factory):
    """600 real PBMC3k cells (a seeded sample, all 9 cell types, their obs names as cell ids), gc30M, 2 shards:
    for runs that need real cells but not all of them (a whole epoch, predicting every cell)."""
    from geneformer_ray.data.tokenize import tokenize

    folder = tmp_path_factory.mktemp("pbmc3k_subset")
    adata = ad.read_h5ad(PBMC3K)
    keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, SUBSET_CELLS, replace=False))
    adata[keep].copy().write_h5ad(folder / "pbmc3k_subset.h5ad")
    tokenize([folder / "pbmc3k_subset.h5ad"], folder / "corpus", vocab="gc30M", cells_per_shard=300, executor="local",
             progress=False)
    return folder / "corpus"


SUBSET_CELLS = 600


def tiny_vocab(*, cls_eos: bool = False, model_input_size: int | None = None) -> Vocabulary:
    """Six genes G1..G6 with medians chosen so hand computation is easy."""
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if cls_eos else [])
    genes = [f"ENSG0000000000{i}" for i in range(1, 7)]
    return Vocabulary(
        name="tiny-v2" if cls_eos else "tiny-v1",
        token_ids={t: i for i, t in enumerate(specials + genes)},
        gene_medians=dict(zip(genes, [1.0, 2.0, 4.0, 0.5, 1.0, 2.0])),
        gene_names={f"GENE{i}": g for i, g in enumerate(genes, 1)},
        id_mapping={},
        model_input_size=model_input_size,
    )


def gene(i: int) -> str:
    return f"ENSG0000000000{i}"


def make_adata(counts, var_ids, *, obs: dict | None = None, id_column: str | None = "ensembl_id") -> ad.AnnData:
    counts = np.asarray(counts)
    var = pd.DataFrame(index=[f"g{j}" for j in range(counts.shape[1])])
    if id_column:
        var[id_column] = var_ids
    else:
        var.index = var_ids
    obs_df = pd.DataFrame(obs or {}, index=[f"cell{i}" for i in range(counts.shape[0])])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs_df, var=var)


def read_corpus_table(corpus: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(Path(corpus).glob("part-*.parquet"))])
