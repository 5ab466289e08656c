"""Shared fixtures: test data paths, a tiny hand-made vocabulary, one Ray instance per session."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_ray.cli import DEMO_DATA
from geneformer_ray.vocab import Vocabulary

TEST_DATA = Path(__file__).parent / "data"
PBMC3K = DEMO_DATA / "pbmc3k_counts.h5ad"
PBMC_SMALL = DEMO_DATA / "pbmc_small_counts.h5ad"
REFERENCE = TEST_DATA / "reference_tokens"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session: 4 logical CPUs on a 2-core box."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
