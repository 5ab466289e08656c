"""Ring 1 of in-silico perturbation, no Ray: perturbed encodings and the perturbations each cell gets
(hand-computed), the model actor's measures against Geneformer's definitions computed by hand with the
full Hugging Face model (BertForMaskedLM, hidden_states[layer]), and every statistics mode on constructed
cases."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertForMaskedLM

from geneformer_ray.infer.config import PerturbConfig
from geneformer_ray.infer.perturb import PerturbParams
from geneformer_ray.infer.perturb_engine import Perturber
from geneformer_ray.infer.perturb_plan import GROUP, ORIGINAL, cell_edits, perturb_encoding
from geneformer_ray.infer.perturb_stats import (
    aggregate_data,
    aggregate_gene_shifts,
    gene_statistics,
    goal_state_shift,
    mixture_model,
    vs_null,
)
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.models.packing import packed_copies


def _encode(ids, tokens, kind, **options):
    v2 = ids[0] == 2
    new, source = perturb_encoding(np.array(ids), tokens, kind, cls_id=2 if v2 else None, eos_id=3 if v2 else None,
                                   max_genes=options.pop("max_genes", 2048), **options)
    return new.tolist(), source.tolist()


def test_perturbed_encodings_and_where_each_gene_came_from():
    v1 = [10, 11, 12, 13]
    assert _encode(v1, (12,), "delete") == ([10, 11, 13], [0, 1, 3])
    assert _encode(v1, (11, 13), "delete") == ([10, 12], [0, 2])
    assert _encode(v1, (12,), "overexpress") == ([12, 10, 11, 13], [2, 0, 1, 3])
    # an absent gene over-expressed at the input size: inserted first (no source), the last gene drops out
    assert _encode(v1, (99,), "overexpress", max_genes=4) == ([99, 10, 11, 12], [-1, 0, 1, 2])
    assert _encode(v1, (99, 12), "overexpress") == ([99, 12, 10, 11, 13], [-1, 2, 0, 1, 3])
    v2 = [2, 10, 11, 12, 3]  # <cls> genes <eos>
    assert _encode(v2, (11,), "delete", max_genes=4094) == ([2, 10, 12, 3], [0, 1, 3, 4])
    assert _encode(v2, (12,), "overexpress", max_genes=4094) == ([2, 12, 10, 11, 3], [0, 3, 1, 2, 4])
    assert _encode(v2, (99,), "overexpress", max_genes=3)[0] == [2, 99, 10, 11, 3]
    # inhibit / activate: moved by quarters of the cell's 8 genes (2 ranks per quartile), clipped at the ends
    eight = list(range(10, 18))
    assert _encode(eight, (12,), "inhibit")[0] == [10, 11, 13, 14, 12, 15, 16, 17]
    assert _encode(eight, (12,), "inhibit", quartiles=3)[0] == [10, 11, 13, 14, 15, 16, 17, 12]
    assert _encode(eight, (15,), "activate")[0] == [10, 11, 12, 15, 13, 14, 16, 17]
    assert _encode(eight, (11,), "activate", quartiles=2) == ([11, 10, 12, 13, 14, 15, 16, 17], [1, 0, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match="use one of delete, overexpress, inhibit, activate"):
        _encode(v1, (12,), "shuffle")


def test_the_perturbations_each_cell_gets():
    genes = np.array([10, 11, 12, 13, 14, 15])
    rng = np.random.default_rng(0)
    every = cell_edits(genes, kind="delete", targets=None, group=False, anchor=None, null_genes=2, rng=rng)
    assert [e.tokens for e in every if e.role == "gene"] == [(g,) for g in genes.tolist()]
    nulls = [e for e in every if e.role == "null"]
    assert len(nulls) == 2 and all(e.tokens[0] in genes for e in nulls)  # drawn from the cell's own perturbations
    over = cell_edits(genes, kind="overexpress", targets=None, group=False, anchor=None, null_genes=1, rng=rng)
    assert [e.gene_token for e in over if e.role == "gene"] == [11, 12, 13, 14, 15]  # the top gene cannot move up
    listed = cell_edits(genes, kind="delete", targets=np.array([12, 99]), group=False, anchor=None, null_genes=3, rng=rng)
    assert [e.tokens for e in listed if e.role == "gene"] == [(12,)]  # a gene the cell lacks cannot be deleted
    assert {e.tokens[0] for e in listed if e.role == "null"} <= {10, 11, 13, 14, 15}
    inserted = cell_edits(genes, kind="overexpress", targets=np.array([12, 99]), group=False, anchor=None, null_genes=1, rng=rng)
    assert [e.tokens for e in inserted if e.role == "gene"] == [(12,), (99,)]
    group = cell_edits(genes, kind="delete", targets=np.array([11, 13, 99]), group=True, anchor=None, null_genes=3, rng=rng)
    assert group[0].role == "group" and group[0].gene_token == GROUP and group[0].tokens == (11, 13)
    assert [len(e.tokens) for e in group[1:]] == [2, 2, 2] and all(not {11, 13} & set(e.tokens) for e in group[1:])
    anchored = cell_edits(genes, kind="delete", targets=None, group=False, anchor=12, null_genes=0, rng=rng)
    assert anchored[0].role == "anchor" and anchored[0].tokens == (12,)
    assert [e.tokens for e in anchored if e.role == "combo"] == [(10, 12), (11, 12), (12, 13), (12, 14), (12, 15)]
    assert [e.tokens for e in anchored if e.role == "gene"] == [(10,), (11,), (13,), (14,), (15,)]
    assert cell_edits(genes, kind="delete", targets=None, group=False, anchor=77, null_genes=2, rng=rng) == []


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    model = build_model("tiny", "gc104M", seed=2).eval()
    return save_model(model, tmp_path_factory.mktemp("v2") / "tiny_v2", vocab="gc104M")


def _hand_states(folder, layer=-2):
    """Geneformer's forward pass: the full masked-LM model, one cell, no padding; its emb_layer -1 (the default,
    ours too) is hidden_states[num_layers - 1], the second to last."""
    model = BertForMaskedLM.from_pretrained(folder, output_hidden_states=True).eval()

    def states(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor(np.asarray(ids))[None]).hidden_states[layer][0]

    return states


def _run_actor(folder, tmp_path, cells, states=None, packing=False, **params):
    params = PerturbParams(model=str(folder), corpus="", **params)
    (tmp_path / "shifts").mkdir(parents=True, exist_ok=True)
    actor = Perturber(str(folder), None, asdict(params), str(tmp_path), 7, states, packing=packing)
    actor({"cell_id": np.array([f"c{i}" for i in range(len(cells))], dtype=object),
           "input_ids": np.array([np.asarray(c) for c in cells] + [None], dtype=object)[:-1]})
    shifts = pd.concat([pq.read_table(p).to_pandas() for p in sorted((tmp_path / "shifts").glob("part-*.parquet"))])
    return shifts.reset_index(drop=True)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_measures_equal_geneformers_definitions_computed_by_hand(v2_model, tmp_path, packing):
    """V2 cells (<cls> ... <eos>) of different lengths in one block: every gene deleted; cosine = the mean over
    the remaining genes of cos(after, before), <cls>/<eos> and the deleted gene left out; cell-and-gene rows
    are those per-gene cosines; a state shift is cos(cell after, state) - cos(cell before, state). Sub-batches
    padded, or packed (copies end to end, attention within each: what CUDA / NPU run in bf16)."""
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2], rng.choice(np.arange(10, 20000), n, replace=False), [3]]) for n in (9, 14, 6)]
    goal = rng.normal(size=64).tolist()
    shifts = _run_actor(v2_model, tmp_path, cells, states={"goal": goal}, packing=packing, perturbation="delete",
                        emb_mode="cell_and_gene")
    states = _hand_states(v2_model)
    gene_rows = pq.read_table(tmp_path / "gene_shifts").to_pandas()
    for i, ids in enumerate(cells):
        before = states(ids)
        cell = shifts[shifts["cell_id"] == f"c{i}"]
        assert len(cell[cell["role"] == "gene"]) == len(ids) - 2
        for _, row in cell[cell["role"] == "gene"].iterrows():
            j = int(np.flatnonzero(ids == row["gene_token"])[0])
            after = states(np.delete(ids, j))
            keep = [k for k in range(len(ids)) if k not in (0, j, len(ids) - 1)]
            cos = torch.nn.functional.cosine_similarity(after[1:-1], before[keep], dim=-1)
            assert row["cosine"] == pytest.approx(cos.mean().item(), abs=2e-6)
            assert row["shift"] == pytest.approx(1 - cos.mean().item(), abs=2e-6)
            mean_after, mean_before = after[1:-1].mean(0), before[1:-1].mean(0)
            cell_cos = torch.nn.functional.cosine_similarity(mean_after, mean_before, dim=0).item()
            assert row["cell_shift"] == pytest.approx(1 - cell_cos, abs=2e-6)
            g = torch.tensor(goal, dtype=torch.float32)
            expected = (torch.nn.functional.cosine_similarity(mean_after, g, dim=0)
                        - torch.nn.functional.cosine_similarity(mean_before, g, dim=0)).item()
            assert row["shift_to_goal"] == pytest.approx(expected, abs=2e-6)
            network = gene_rows[(gene_rows["cell_id"] == f"c{i}") & (gene_rows["perturbed"] == row["gene_token"])]
            assert network["affected"].tolist() == ids[keep].tolist()
            np.testing.assert_allclose(network["cosine"], cos.numpy(), atol=2e-6)
    originals = shifts[shifts["role"] == "original"]
    assert (originals["gene_token"] == ORIGINAL).all() and (originals["shift"] == 0).all()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_cls_mode_and_overexpression_of_a_set(v2_model, tmp_path, packing):
    """<cls> modes: the shift is 1 - cos(<cls> after, <cls> before); cls_and_gene adds the genes' own rows. A set over-expressed together: one row
    per cell; the comparison leaves the moved genes out (and the inserted one has nothing to compare)."""
    rng = np.random.default_rng(1)
    cells = [np.concatenate([[2], rng.choice(np.arange(10, 20000), n, replace=False), [3]]) for n in (8, 11)]
    in_both = int(cells[0][3])
    cells[1][4] = in_both
    genes = [v for v, t in __import__("geneformer_ray.data.vocab", fromlist=["x"]).load_vocab("gc104M").token_ids.items()
             if t in (in_both, 500)]
    shifts = _run_actor(v2_model, tmp_path / "cls", cells, packing=packing, perturbation="overexpress", emb_mode="cls_and_gene",
                        genes=sorted(genes), group=True, null_genes=2)
    states = _hand_states(v2_model)
    tokens = tuple(int(t) for t in shifts.loc[shifts["role"] == "group", "perturbed"].iloc[0])
    assert set(tokens) == {in_both, 500}
    for i, ids in enumerate(cells):
        row = shifts[(shifts["cell_id"] == f"c{i}") & (shifts["role"] == "group")].iloc[0]
        new, _ = perturb_encoding(ids, tokens, "overexpress", cls_id=2, eos_id=3, max_genes=4094)
        cls = torch.nn.functional.cosine_similarity(states(new)[0], states(ids)[0], dim=0).item()
        assert row["shift"] == pytest.approx(1 - cls, abs=2e-6)
        network = pq.read_table(tmp_path / "cls" / "gene_shifts", filters=[("cell_id", "=", f"c{i}")]).to_pandas()
        assert set(network["role"]) == {"group"} and (network["perturbed"] == GROUP).all()  # nulls are no network
        assert sorted(network["affected"]) == sorted(set(ids[1:-1].tolist()) - set(tokens))  # the moved genes left out
        nulls = shifts[(shifts["cell_id"] == f"c{i}") & (shifts["role"] == "null")]
        assert len(nulls) == 2 and all(len(t) == 2 for t in nulls["perturbed"])


def test_config_refuses_what_cannot_run():
    base = {"model": "/m", "corpus": "/c", "out": "/o", "perturbation": "delete"}
    for values, message in [
        ({"genes": ["CD74"], "group": True}, r"--group perturbs the given --genes together: pass two or more"),
        ({"all_genes": True, "group": True}, r"--group perturbs"),
        ({"genes": ["CD74", "LYZ"], "group": True, "anchor": "CD3E"}, r"does not combine with --group"),
        ({"all_genes": True, "perturbation": "inhibit", "quartiles": 4}, r"--quartiles 4"),
        ({"all_genes": True, "alt_states": ["cell_type=NK"]}, r"--alt-state needs --start-state and --goal-state"),
        ({"all_genes": True, "start_state": "cell_type=B", "goal_state": "cell_type=NK", "alt_states": ["donor=x"]},
         r"use the goal's column 'cell_type'"),
        ({"all_genes": True, "cell_range": "5:2"}, r"--cell-range '5:2': use START:END"),
        ({"all_genes": True, "filters": ["cell_type"]}, r"--filter 'cell_type': use COLUMN=VALUE"),
        ({"all_genes": True, "emb_mode": "gene"}, r"--emb-mode 'gene': use cell, cls, cell_and_gene, cls_and_gene"),
        ({"all_genes": True, "perturbation": "knockout"}, r"use delete, overexpress, inhibit, activate"),
    ]:
        with pytest.raises(ValueError, match=message):
            PerturbConfig(**{**base, **values})
    cfg = PerturbConfig(**base, all_genes=True, filters=["cell_type=B,NK", "donor=1"], cell_range=":50")
    assert cfg.cell_filters == [["cell_type", ["B", "NK"]], ["donor", ["1"]]] and cfg.cell_slice == [0, 50]


# -- statistics -------------------------------------------------------------------------------------
def _rows(role, token, values, *, start=0, **extra):
    n = len(values)
    return pd.DataFrame({"cell_id": [f"c{start + i}" for i in range(n)], "role": role, "gene_token": token,
                         "perturbed": [[token]] * n, "shift": values, "cell_shift": values, **extra})


def test_vs_random_and_aggregate_data():
    rng = np.random.default_rng(0)
    frame = pd.concat([_rows("null", 100, rng.normal(0.10, 0.01, 300)), _rows("gene", 7, rng.normal(0.30, 0.01, 40)),
                       _rows("gene", 8, rng.normal(0.10, 0.01, 40)), _rows("gene", 9, [0.5, 0.6]),
                       _rows("original", ORIGINAL, np.zeros(40))], ignore_index=True)
    stats = gene_statistics(frame).set_index("gene_token")
    assert list(gene_statistics(frame)["gene_token"][:2]) == [7, 8] and ORIGINAL not in stats.index
    assert stats.loc[7, "cells"] == 40 and stats.loc[7, "mean_shift"] == pytest.approx(0.30, abs=0.01)
    assert stats.loc[7, "fdr"] < 1e-10 and stats.loc[8, "fdr"] > 0.05
    assert np.isnan(stats.loc[9, "p_value"])  # 2 cells: not tested
    raw = aggregate_data(frame, genes=[7, 9])
    assert sorted(raw["gene_token"].unique()) == [7, 9] and len(raw) == 42
    with pytest.raises(ValueError, match="no cell of this run has a perturbation of"):
        aggregate_data(frame, genes=[12345])


def test_goal_state_shift_pools_every_gene_as_the_random_distribution():
    rng = np.random.default_rng(1)
    towards = rng.normal(0.02, 0.002, 50)
    parts = [_rows("gene", 7, towards, shift_to_goal=towards, shift_to_start=-towards, shift_to_alt1=towards / 10)]
    for token in range(100, 140):
        noise = rng.normal(0.0, 0.002, 50)
        parts.append(_rows("gene", token, noise, shift_to_goal=noise, shift_to_start=noise, shift_to_alt1=noise))
    stats = goal_state_shift(pd.concat(parts, ignore_index=True), states=["start", "goal", "alt1"], all_genes=True)
    top = stats.iloc[0]
    assert top["gene_token"] == 7 and top["significant"] and top["fdr"] < 1e-6
    assert top["mean_shift_to_goal"] == pytest.approx(towards.mean()) and top["mean_shift_to_start"] < 0
    assert {"p_value_alt1", "fdr_alt1", "p_value_start", "fdr_start"} <= set(stats.columns)
    assert stats["significant"].sum() <= 3  # the noise genes are not


def test_vs_null_against_another_run():
    rng = np.random.default_rng(2)
    test = pd.concat([_rows("gene", 7, rng.normal(0.3, 0.01, 30)), _rows("gene", 8, rng.normal(0.1, 0.01, 30))])
    null = pd.concat([_rows("gene", 7, rng.normal(0.1, 0.01, 30)), _rows("gene", 8, rng.normal(0.1, 0.01, 30))])
    stats = vs_null(test, null).set_index("gene_token")
    assert stats.loc[7, "significant"] and not stats.loc[8, "significant"]
    assert stats.loc[7, "mean_shift_minus_null"] == pytest.approx(0.2, abs=0.01)
    missing = vs_null(_rows("gene", 9, [0.1, 0.2, 0.3]), null)
    assert missing["p_value"].item() == 1.0 and np.isnan(missing["null_mean_shift"].item())


def test_mixture_model_separates_impactful_genes_and_combines_with_an_anchor():
    rng = np.random.default_rng(3)
    parts = [_rows("gene", t, rng.normal(0.30 if t < 110 else 0.05, 0.005, 20)) for t in range(100, 140)]
    stats = mixture_model(pd.concat(parts, ignore_index=True)).set_index("gene_token")
    assert stats.loc[range(100, 110), "impactful"].all() and not stats.loc[range(110, 140), "impactful"].any()
    assert (stats.loc[range(100, 110), "impact_percent"] == 100).all()
    # anchor runs: the anchor alone, each gene alone, the pair; combo - sum shows the interaction
    cells = [f"c{i}" for i in range(10)]
    anchor = pd.DataFrame({"cell_id": cells, "role": "anchor", "gene_token": 5, "shift": 0.10})
    frames = [anchor]
    for token in range(100, 112):
        frames.append(pd.DataFrame({"cell_id": cells, "role": "gene", "gene_token": token, "shift": 0.02}))
        pair = 0.12 if token != 100 else 0.40  # gene 100 acts with the anchor
        frames.append(pd.DataFrame({"cell_id": cells, "role": "combo", "gene_token": token, "shift": pair}))
    combos = mixture_model(pd.concat(frames, ignore_index=True)).set_index("gene_token")
    assert combos.loc[100, "impactful"] and combos.loc[100, "combo_minus_sum"] == pytest.approx(0.28)
    assert combos.loc[101, "anchor_shift"] == pytest.approx(0.10) and combos.loc[101, "sum_of_shifts"] == pytest.approx(0.12)
    assert combos.loc[101, "combo_minus_sum"] == pytest.approx(0.0) and not combos.loc[101, "impactful"]
    with pytest.raises(ValueError, match="at least 2 genes"):
        mixture_model(_rows("gene", 7, [0.1, 0.2]))


def test_gene_pair_shifts_are_summed_part_by_part(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "gene_shifts"
    folder.mkdir()
    frames = []
    for part in range(3):
        frame = pd.DataFrame({"cell_id": [f"p{part}c{i % 5}" for i in range(60)], "role": "gene",
                              "perturbed": rng.integers(10, 13, 60).astype(np.int32),
                              "affected": rng.integers(20, 24, 60).astype(np.int32),
                              "cosine": rng.uniform(0.5, 1.0, 60).astype(np.float32)})
        frame.to_parquet(folder / f"part-{part}.parquet", index=False)
        frames.append(frame)
    table = aggregate_gene_shifts(folder).set_index(["perturbed", "affected"]).sort_index()
    expected = pd.concat(frames).astype({"cosine": np.float64}).groupby(["perturbed", "affected"])["cosine"].agg(
        ["mean", "std", "count"])
    np.testing.assert_allclose(table["mean_cosine"], expected["mean"], rtol=1e-9)
    np.testing.assert_allclose(table["sd_cosine"], expected["std"], rtol=1e-6)
    assert (table["cells"] == expected["count"]).all() and np.allclose(table["mean_shift"], 1 - expected["mean"])


def test_packing_goes_where_attention_has_a_varlen_kernel():
    """``--packing auto`` packs sub-batches of copies on CUDA / NPU in bf16 (flash / TND varlen attention), not on a
    CPU (measured slower) nor in fp32 on an accelerator (no varlen kernel: the fallback pads again); on / off are obeyed."""
    assert packed_copies("auto", "cuda", "bfloat16") and packed_copies("auto", "npu", "bfloat16")
    assert not packed_copies("auto", "cuda", None) and not packed_copies("auto", "npu", None)
    assert not packed_copies("auto", "cpu", "bfloat16") and not packed_copies("auto", "cpu", None)
    assert packed_copies("on", "cpu", None) and not packed_copies("off", "cuda", "bfloat16")
    with pytest.raises(ValueError, match="packing='sometimes'"):
        packed_copies("sometimes", "cpu", None)
    assert PerturbConfig(model="m", corpus="c", out="o", perturbation="delete", all_genes=True, packing=True).packing == "on"
    with pytest.raises(ValueError, match="--packing 'yes': use auto, on, off"):
        PerturbConfig(model="m", corpus="c", out="o", perturbation="delete", all_genes=True, packing="yes")


def test_sort_lengths_equal_the_encodings(v2_model, tmp_path):
    """The actor length-sorts copies before building them: its length rule must be the encoding's."""
    ids = np.array([2, 10, 11, 12, 13, 14, 3])
    for kind in ("delete", "overexpress", "inhibit", "activate"):
        params = PerturbParams(model=str(v2_model), corpus="", perturbation=kind)
        actor = Perturber(str(v2_model), None, asdict(params), str(tmp_path), 4)
        actor.max_genes = 6
        for tokens in [(12,), (12, 99), (98, 99), (10, 11, 12, 13, 14), (99, 98, 97)]:
            new, _ = perturb_encoding(ids, tokens, kind, cls_id=2, eos_id=3, max_genes=6)
            assert actor._encoded_length(ids, set(ids.tolist()), tokens) == len(new), (kind, tokens)


def test_every_gene_deletion_is_built_by_index_arithmetic_as_copy_by_copy(v2_model, tmp_path):
    """The single-deletion fast path gives the same ids, mask, source positions and comparison as the
    general per-copy encoding, on V2 cells of different lengths in one sub-batch."""
    rng = np.random.default_rng(5)
    cells = [np.concatenate([[2], rng.choice(np.arange(10, 20000), n, replace=False), [3]]) for n in (9, 4, 7)]
    params = PerturbParams(model=str(v2_model), corpus="", perturbation="delete")
    actor = Perturber(str(v2_model), None, asdict(params), str(tmp_path), 4)
    copies = [(owner, (int(t),)) for owner, c in enumerate(cells) for t in c[1:-1]]
    at = actor._single_deletions(cells, copies)
    assert at is not None and at.tolist() == [i for c in cells for i in range(1, len(c) - 1)]
    chunk = np.array([0, 5, 9, 12, 15, 3])
    for fast, slow in zip(actor._deletion_batch(cells, copies, chunk, at), actor._encoded_batch(cells, copies, chunk)):
        np.testing.assert_array_equal(fast, slow)
    assert actor._single_deletions(cells, copies + [(0, (int(cells[0][1]), int(cells[0][2])))]) is None  # a pair
    assert actor._single_deletions(cells, [(1, (99999,))]) is None  # a gene the cell lacks
