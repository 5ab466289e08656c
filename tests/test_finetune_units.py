"""Ring 1 of fine-tuning: splits, gene lists, classes, frozen layers, LoRA, multitask init, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geneformer_ray.train.config import FinetuneConfig
from geneformer_ray.settings import load_config
from geneformer_ray.models.flavours import build_model
from geneformer_ray.models.folders import save_model
from geneformer_ray.train.splits import gene_folds, split_cells, split_from_id_lists
from geneformer_ray.models.tasks import add_lora, build_task_model, check_head, freeze_layers, merge_lora
from geneformer_ray.train.labels import class_table, label_indices, read_gene_classes
from geneformer_ray.train.prepare import prepare_task

from conftest import PBMC3K, TEST_DATA

GENE_LISTS = TEST_DATA / "gene_lists"


# -- splits -------------------------------------------------------------------------------------------
def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.repeat(["a", "b", "c"], [50, 20, 4])
    split = split_cells(labels, val_fraction=0.1, test_fraction=0.25, seed=1)
    for label in "abc":
        sides = set(split[labels == label])
        assert {"train", "test"} <= sides
    assert abs((split == "test").mean() - 0.25) < 0.05
    with pytest.raises(ValueError, match="class 'd' has 1 cell"):
        split_cells(np.array(["a"] * 5 + ["d"]), test_fraction=0.2)


@pytest.mark.parametrize("seed", range(8))
def test_group_split_never_puts_a_group_in_two_splits(seed):
    rng = np.random.default_rng(seed)
    groups = rng.choice([f"donor{i}" for i in range(9)], size=600)
    split = split_cells(rng.choice(["x", "y"], 600), method="group", groups=groups, val_fraction=0.15, test_fraction=0.2,
                        seed=seed)
    for group in np.unique(groups):
        assert len(set(split[groups == group])) == 1
    assert {"train", "val", "test"} == set(split)
    with pytest.raises(ValueError, match="needs at least 3 groups"):
        split_cells(np.array(["x"] * 4), method="group", groups=np.array(["g1", "g1", "g2", "g2"]))


def test_id_list_split(tmp_path):
    (tmp_path / "train.txt").write_text("c1\nc2\nc3\n")
    (tmp_path / "test.txt").write_text("c4\n")
    split = split_from_id_lists(np.array(["c1", "c2", "c3", "c4", "c5"]),
                                {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"})
    assert split.tolist() == ["train", "train", "train", "test", ""]
    (tmp_path / "clash.txt").write_text("c1\n")
    with pytest.raises(ValueError, match="listed in both"):
        split_from_id_lists(np.array(["c1"]), {"train": tmp_path / "train.txt", "test": tmp_path / "clash.txt"})
    with pytest.raises(ValueError, match="none of the 3 cell ids"):
        split_from_id_lists(np.array(["zz"]), {"train": tmp_path / "train.txt"})


def test_gene_folds_never_leak_a_gene_and_test_each_gene_once():
    genes = [f"g{i}" for i in range(40)]
    classes = ["s"] * 12 + ["i"] * 28
    folds = gene_folds(genes, classes, num_folds=4, seed=3)
    tested = [g for _, test in folds for g in test]
    assert sorted(tested) == sorted(genes)
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 40
        assert {"s", "i"} <= {classes[genes.index(g)] for g in test}  # stratified
    with pytest.raises(ValueError, match="smallest class"):
        gene_folds(genes[:6], ["s"] * 2 + ["i"] * 4, num_folds=3)


# -- labels and gene lists -------------------------------------------------------------------------------
def test_gene_lists_wide_and_long():
    wide = read_gene_classes(GENE_LISTS / "dosage_sens_tf_labels.csv")
    assert len(wide) == 490 and sorted(set(wide.values())) == ["dosage_insensitive", "dosage_sensitive"]
    assert sum(v == "dosage_sensitive" for v in wide.values()) == 122
    long = read_gene_classes(GENE_LISTS / "is_longrange_tf.csv", label_column="is_longrange")
    assert len(long) == 176 and sum(v == "True" for v in long.values()) == 46


def test_gene_list_errors(tmp_path):
    clash = tmp_path / "clash.csv"
    clash.write_text("a,b\nENSG00000008197,ENSG00000008197\n")
    with pytest.raises(ValueError, match="listed in two classes"):
        read_gene_classes(clash)
    one = tmp_path / "one.csv"
    one.write_text("a\nENSG00000008197\n")
    with pytest.raises(ValueError, match="at least two classes"):
        read_gene_classes(one)


def test_small_classes_are_dropped_and_missing_labels_ignored():
    values = ["T"] * 12 + ["B"] * 11 + ["rare"] * 3 + [None, "", float("nan")]
    classes, dropped = class_table(values, min_class_size=10, column="cell_type")
    assert classes == ["B", "T"] and dropped == {"rare": 3}
    indices = label_indices(values, classes)
    assert (indices[:12] == 1).all() and (indices[12:23] == 0).all() and (indices[23:] == -100).all()


# -- models --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained") / "model"
    save_model(build_model("tiny", seed=7), folder, vocab="gc30M")
    return folder


def _steps(model, n=3, num_labels=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(2, 25_000, (4, 12), generator=gen)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits, torch.randint(0, num_labels, (4,), generator=gen)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_frozen_layers_really_do_not_change(pretrained):
    model = build_task_model("cell", {"y": ["a", "b", "c"]}, init_from=str(pretrained))
    freeze_layers(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model)
    for name, p in model.named_parameters():
        frozen = name.startswith("bert.embeddings") or name.startswith("bert.encoder.layer.0.")
        assert torch.equal(p, before[name]) == frozen, name
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        freeze_layers(model, 3)
    only_embeddings = build_task_model("cell", {"y": ["a", "b", "c"]}, init_from=str(pretrained))
    assert freeze_layers(only_embeddings, 0, embeddings=True) == \
        sum(p.numel() for p in only_embeddings.bert.embeddings.parameters())
    before = {n: p.detach().clone() for n, p in only_embeddings.named_parameters()}
    _steps(only_embeddings)
    for name, p in only_embeddings.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("bert.embeddings"), name


def test_multitask_encoder_starts_from_the_checkpoint(pretrained):
    from transformers import BertForMaskedLM

    mlm = BertForMaskedLM.from_pretrained(pretrained)
    model = build_task_model("multitask", {"cell_type": ["a", "b", "c"], "lineage": ["x", "y"]}, init_from=str(pretrained))
    reference = mlm.bert.state_dict()
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, reference[name]), name
    ids = torch.randint(2, 25_000, (2, 9))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out["cell_type"].shape == (2, 3) and out["lineage"].shape == (2, 2)


def test_lora_trains_only_adapters_and_head_then_merges_into_a_plain_model(pretrained, tmp_path):
    from transformers import BertForSequenceClassification

    model = add_lora(build_task_model("cell", {"y": ["a", "b", "c"]}, init_from=str(pretrained)), "cell", rank=4,
                     alpha=8, dropout=0.0, target_modules=["query", "value"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n or "pooler" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _steps(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    ids = torch.randint(2, 25_000, (3, 10))
    expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    plain = merge_lora(model)
    assert type(plain) is BertForSequenceClassification and not any("lora" in n for n, _ in plain.named_parameters())
    save_model(plain, tmp_path / "merged", vocab="gc30M")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, expected, atol=1e-5)
    with pytest.raises(ValueError, match="3 labels; this cell task has 9"):
        check_head("cell", {"cell_type": [f"c{i}" for i in range(9)]}, tmp_path / "merged")


# -- bad input, caught on the driver ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(pbmc3k_v1_corpus):
    return pbmc3k_v1_corpus


def _cfg(corpus, *extra):
    return load_config(FinetuneConfig, None, [f"data.corpus={corpus}", "task.label_column=cell_type", *extra])


def test_bad_fine_tuning_input_is_refused_before_workers_start(corpus, tmp_path, pretrained):
    with pytest.raises(ValueError, match="has no column 'donor'.*--obs COLUMN"):
        prepare_task(_cfg(corpus, "task.label_column=donor"))
    import anndata as ad

    from geneformer_ray.data.tokenize import tokenize

    few = ad.read_h5ad(PBMC3K)[:30].copy()
    few.obs["cell_type"] = ["T"] * 15 + ["B"] * 14 + ["lonely"]
    few.write_h5ad(tmp_path / "few.h5ad")
    tokenize([tmp_path / "few.h5ad"], tmp_path / "few", vocab="gc30M", executor="local", progress=False)
    with pytest.raises(ValueError, match="class 'lonely' has 1 cell"):
        prepare_task(_cfg(tmp_path / "few", "task.min_class_size=1"))
    v2 = save_model(build_model("tiny", "gc104M"), tmp_path / "v2model", vocab="gc104M")
    with pytest.raises(ValueError, match="re-tokenize the data with --vocab gc104M"):
        prepare_task(_cfg(corpus, f"model.init_from={v2}"))  # a gc104M model on a gc30M corpus
    absent = tmp_path / "absent.csv"
    from geneformer_ray.data.corpus import read_columns
    from geneformer_ray.data.vocab import load_vocab

    present = {int(t) for ids in read_columns(corpus, ["input_ids"]).column("input_ids").to_pylist() for t in ids}
    vocab = load_vocab("gc30M")
    unseen = [g for g, t in vocab.token_ids.items() if t not in present and g.startswith("ENSG")][:4]
    absent.write_text("a,b\n" + "\n".join(f"{unseen[i]},{unseen[i + 2]}" for i in range(2)) + "\n")
    with pytest.raises(ValueError, match="none of the 4 genes .* occurs in corpus"):
        prepare_task(_cfg(corpus, "task.kind=gene", f"task.gene_classes={absent}"))
    head = tmp_path / "head3"
    save_model(build_task_model("cell", {"y": ["a", "b", "c"]}, init_from=str(pretrained)), head, vocab="gc30M")
    with pytest.raises(ValueError, match="3 labels; this cell task has 9"):
        prepare_task(_cfg(corpus, f"model.init_from={head}", "task.min_class_size=1"))
    with pytest.raises(ValueError, match="task.kind=multitask needs task.label_columns"):
        _cfg(corpus, "task.kind=multitask")


def test_evaluations_per_epoch_or_every_n_steps_not_both():
    cfg = load_config(FinetuneConfig, None, ["data.corpus=c", "task.label_column=y", "train.evals_per_epoch=4"])
    assert cfg.train.evals_per_epoch == 4 and cfg.train.eval_every is None
    for bad, message in (("train.evals_per_epoch=0", "must be at least 1"),
                         ("train.eval_every=20", r"not set together with train.eval_every=20")):
        extra = ["train.evals_per_epoch=4"] if "eval_every" in bad else []
        with pytest.raises(ValueError, match=message):
            load_config(FinetuneConfig, None, ["data.corpus=c", "task.label_column=y", bad, *extra])


def test_epochs_done_counts_whole_epochs_and_the_part_of_the_current_one():
    from geneformer_ray.train.finetune import _epochs_done

    assert _epochs_done({"step": 5, "epoch": 0, "epoch_start": 0}, 20) == 0.25
    assert _epochs_done({"step": 23, "epoch": 0, "epoch_start": 0}, 20) == 1.0  # an epoch a few batches long stays 1
    assert _epochs_done({"step": 23, "epoch": 1, "epoch_start": 23}, 20) == 1.0  # its end: an integer
    assert _epochs_done({"step": 33, "epoch": 1, "epoch_start": 23}, 20) == 1.5


def test_splits_held_in_memory_are_dealt_to_ranks_like_a_streaming_split():
    from geneformer_ray.train.collate import iter_padded_batches
    from geneformer_ray.train.task_batches import MemorySplit, split_rows

    rng = np.random.default_rng(0)
    corpus = {"input_ids": np.array([rng.integers(10, 99, n) for n in rng.integers(3, 40, 101)], dtype=object),
              "cell_id": np.array([f"c{i}" for i in range(101)], dtype=object)}
    corpus["length"] = np.array([len(c) for c in corpus["input_ids"]])
    labels = {f"c{i}": [i % 3, i % 2] for i in range(0, 101, 2)}  # 51 cells of this split, two heads
    rows = split_rows(corpus, labels)
    assert rows["labels"].shape == (51, 2) and list(rows["labels"][5]) == labels[rows["cell_id"][5]]
    assert set(rows["cell_id"]) == set(labels)

    def cells(rank, epoch):
        shard = MemorySplit(rows, rank, 2, seed=epoch)
        return [c for b in iter_padded_batches(shard, pad_id=0, batch_size=4, window_batches=2, shuffle_buffer=0,
                                               seed=epoch, columns=["cell_id", "labels"]) for c in b["cell_id"]]

    for epoch in (0, 1):
        a, b = cells(0, epoch), cells(1, epoch)
        assert not set(a) & set(b) and set(a) | set(b) == set(labels) and abs(len(a) - len(b)) <= 1
    assert cells(0, 0) != cells(0, 1)  # another order every epoch
    assert cells(0, 1) == cells(0, 1)  # and the same one for the same seed
    whole = MemorySplit(rows, 1, 2, seed=None)  # evaluation: every row (the caller keeps the rank's stripe)
    assert sum(len(b["cell_id"]) for b in whole.iter_batches(batch_size=7)) == 51


def test_data_loader_is_one_of_three():
    with pytest.raises(ValueError, match=r"data.loader='disk': use auto, memory .* or stream"):
        load_config(FinetuneConfig, None, [f"data.corpus={PBMC3K}", "data.loader=disk", "task.label_column=cell_type"])


def test_same_genes_baseline_reads_each_cells_tokens_in_the_order_asked(pbmc3k_v1_corpus):
    """The baseline on the model's own input: row i of the bag holds exactly cell i's tokens (cells asked
    for across shards, in an order of their own), one per gene."""
    import pyarrow.parquet as pq

    from geneformer_ray.data.corpus import shard_paths
    from geneformer_ray.train.baseline import token_genes

    table = pq.read_table(shard_paths(pbmc3k_v1_corpus)[-1], columns=["cell_id", "input_ids"])
    first = pq.read_table(shard_paths(pbmc3k_v1_corpus)[0], columns=["cell_id", "input_ids"])
    cells = {c: set(t) for c, t in zip(table.column("cell_id").to_pylist()[:5] + first.column("cell_id").to_pylist()[:5],
                                       table.column("input_ids").to_pylist()[:5] + first.column("input_ids").to_pylist()[:5])}
    order = sorted(cells, reverse=True)
    bag = token_genes(pbmc3k_v1_corpus, order, 25_426)
    assert bag.shape == (10, 25_426) and set(bag.data) == {1.0}
    for row, cell in enumerate(order):
        assert set(bag[row].indices) == cells[cell], cell
