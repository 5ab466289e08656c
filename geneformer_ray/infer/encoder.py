"""The shared base of every inference stage: a model folder's encoder cut at one layer, cells read from a
corpus in length-sorted chunks, and the checks of a model against a corpus.

    encoder = CellEncoder("runs/quickstart/model", layer=-1)          # in a model actor, or in-process
    vectors = encoder.cell_embeddings([cell_a_tokens, cell_b_tokens])  # (cells, hidden) float32
    manifest, config, vocab = check_model_and_corpus(model_dir, corpus, layer=-1)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from transformers import BertModel

from geneformer_ray.data.corpus import keep_cells, read_columns, read_corpus, read_manifest, shard_paths
from geneformer_ray.models.attention import use_geneformer_attention
from geneformer_ray.models.folders import check_corpus_vocab, load_model, model_vocab, read_model_config
from geneformer_ray.models.packing import packed_hidden, segment_mean
from geneformer_ray.runtime import AcceleratorConfig, actor_device, autocast, pad_multiple, plan_accelerator
from geneformer_ray.train.collate import pack_cells, pad_cells


def hidden_state_index(layer: int, num_layers: int) -> int:
    """How many encoder layers to run for Geneformer's layer choice (0 = last, -1 = second to last)."""
    if not -num_layers <= layer <= 0:
        raise ValueError(f"--layer {layer} is out of range for a {num_layers}-layer model: use 0 (the last layer), "
                         f"-1 (the second to last, Geneformer's default) down to -{num_layers} (the input embeddings)")
    return num_layers + layer


class CellEncoder:
    """A model folder's BERT encoder cut after one layer, and the pooling of its token states.

    Used inside model actors (embedding, perturbation) and by the benchmarks' single-process peer.
    """

    def __init__(self, model_dir: str | Path, *, layer: int = -1, plan=None, packing: bool = False):
        transformers.logging.set_verbosity_error()  # the head weights left unused are expected here
        self.plan = plan or plan_accelerator(AcceleratorConfig(type="cpu"), {}).to_dict()
        model, self.vocab = load_model(model_dir, model_class=BertModel, add_pooling_layer=False)
        self.num_layers = model.config.num_hidden_layers
        model.encoder.layer = model.encoder.layer[: hidden_state_index(layer, self.num_layers)]
        self.device = actor_device(self.plan)
        self.model = model.to(self.device).eval()
        self.special_ids = torch.tensor(sorted(self.vocab.special_token_ids.values()), device=self.device)
        self.pad_multiple = pad_multiple(self.plan)
        self.max_width = model.config.max_position_embeddings
        self.hidden_size = model.config.hidden_size
        self.packing = packing  # cell_embeddings on packed rows (geneformer_ray.models.packing)
        if packing:
            use_geneformer_attention(model, sparse_dropout=False)

    def states(self, cells: list[np.ndarray]):
        """Token states (batch, width, hidden) as float32, the gene-token mask (batch, width) and the ids."""
        input_ids, attention_mask = pad_cells(cells, pad_id=self.vocab.pad_id, multiple=self.pad_multiple,
                                              max_width=self.max_width)
        return self.batch_states(input_ids, attention_mask)

    def batch_states(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """``states`` of a batch already padded, (batch, width) ids and mask (each row's tokens first): the
        model runs over the rows packed when the encoder packs, over the padded batch otherwise."""
        if self.packing:
            return self.packed_states(input_ids, attention_mask)
        return self.padded_states(input_ids, attention_mask)

    def packed_states(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """``padded_states`` with the model run over the rows laid end to end (no padding on any layer, attention
        within each row: on CUDA / NPU in bf16 the varlen kernels), the states put back in the padded layout."""
        lengths = attention_mask.sum(1)
        row = pack_cells([ids[:n] for ids, n in zip(input_ids, lengths) if n], pad_id=self.vocab.pad_id,
                         multiple=self.pad_multiple)
        ids, real = self.to_device(input_ids), self.to_device(attention_mask).bool()
        # where each packed token goes in the (batch x width) layout, counted on the host: a boolean index on the
        # device would make the host wait for every kernel queued so far
        where = self.to_device(np.flatnonzero(attention_mask.reshape(-1)))
        with torch.inference_mode():
            hidden = torch.zeros(*input_ids.shape, self.hidden_size, device=self.device)
            if row["num_cells"]:
                with autocast(self.plan, self.device):
                    packed = packed_hidden(self.model, self.to_device(row["input_ids"]), self.to_device(row["position_ids"]),
                                           row["cu_seqlens"])[0]  # (tokens, hidden)
                hidden.view(-1, self.hidden_size).index_copy_(0, where, packed[: where.numel()].float())
        return hidden, real & ~torch.isin(ids, self.special_ids), ids

    def padded_states(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """``batch_states`` over the padded batch."""
        ids, mask = self.to_device(input_ids), self.to_device(attention_mask)
        # no padding in the batch (length-sorted copies often have none): no mask, so attention takes the
        # fused kernel instead of materialising a mask per head
        full = bool(attention_mask.all())
        with torch.inference_mode(), autocast(self.plan, self.device):  # per call: actors run batches in threads
            hidden = self.model(input_ids=ids, attention_mask=None if full else mask).last_hidden_state
        genes = mask.bool() & ~torch.isin(ids, self.special_ids)  # (batch, width)
        return hidden.float(), genes, ids

    def to_device(self, array: np.ndarray):
        """A host array on the model's device. On an accelerator through pinned memory without waiting: a
        copy from pageable memory would wait for the kernels queued before it, so the host could not
        prepare the next batch while the device computes this one."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def cell_embeddings(self, cells: list[np.ndarray], mode: str = "mean") -> np.ndarray:
        """(batch, hidden) float32: the mean of gene-token states, or the <cls> state."""
        if self.packing:
            return self.packed_embeddings(cells, mode)
        hidden, genes, _ = self.states(cells)
        if mode == "cls":
            return hidden[:, 0].cpu().numpy()
        with torch.inference_mode():
            return mean_pool(hidden, genes).cpu().numpy()

    def packed_embeddings(self, cells: list[np.ndarray], mode: str = "mean") -> np.ndarray:
        """``cell_embeddings`` from one packed row: no padding on any layer, attention within each cell."""
        row = pack_cells(cells, pad_id=self.vocab.pad_id, multiple=self.pad_multiple)
        ids, positions = self.to_device(row["input_ids"]), self.to_device(row["position_ids"])
        offsets = row["cu_seqlens"]
        with torch.inference_mode(), autocast(self.plan, self.device):
            hidden = packed_hidden(self.model, ids, positions, offsets)[0].float()  # (tokens, hidden)
        with torch.inference_mode():
            if mode == "cls":
                return hidden[torch.as_tensor(offsets[: len(cells)], dtype=torch.long, device=hidden.device)].cpu().numpy()
            genes = self.to_device(row["attention_mask"][0]).bool() & ~torch.isin(ids[0], self.special_ids)
            return segment_mean(hidden, offsets, genes)[: len(cells)].cpu().numpy()


def mean_pool(hidden, genes):
    """(batch, hidden): the mean over each row's gene tokens (``genes`` (batch, width) bool)."""
    weights = genes.unsqueeze(-1).to(hidden.dtype)  # (batch, width, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def length_sorted_chunks(lengths, batch_size: int) -> list[np.ndarray]:
    """Row indices, longest first, in chunks of ``batch_size``: cells of similar length pad little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


def read_cells_dataset(corpus, *, columns: list[str] | None = None, cell_ids: list[str] | None = None, rows_per_block: int = 256):
    """A Ray Dataset of the corpus (or of the given cells), in blocks of ``rows_per_block`` so that every
    model actor gets work (a shard is one block otherwise)."""
    ds = read_corpus(corpus, columns=columns)
    if cell_ids is not None:
        ds = ds.map_batches(keep_cells, fn_kwargs={"cell_ids": list(cell_ids)}, batch_format="pyarrow", batch_size=None)
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def select_cells(corpus: str | Path, *, max_cells: int | None = None, where: tuple[str, str] | None = None,
                 seed: int = 0, label: str = "--max-cells") -> list[str] | None:
    """Cell ids to use (None: every cell): those whose column ``where[0]`` equals ``where[1]``, then at
    most ``max_cells`` of them (seeded sample, corpus order kept)."""
    if max_cells is None and where is None:
        return None
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"{label} {max_cells} must be at least 1")
    columns = ["cell_id"] + ([where[0]] if where else [])
    table = read_columns(corpus, columns).to_pandas()
    if where is not None:
        table = table[table[where[0]].astype(str) == str(where[1])]
    ids = table["cell_id"].astype(str).to_numpy()
    if max_cells is not None and ids.size > max_cells:
        ids = ids[np.sort(np.random.default_rng(seed).choice(ids.size, max_cells, replace=False))]
    return ids.tolist()


def check_column_value(manifest: dict, corpus, column: str, value: str | None, flag: str) -> None:
    """A metadata column (and value) the corpus must hold, else a clear error naming what it has."""
    columns = [c for c in manifest.get("columns", {}) if c not in ("input_ids", "length", "counts")]
    if column not in columns:
        raise ValueError(f"{flag}: the corpus {corpus} has no column {column!r}; it has {columns} "
                         "(tokenize with --obs COLUMN to carry it)")
    if value is not None:
        values = read_columns(corpus, [column]).column(0).to_pandas().astype(str)
        if str(value) not in set(values):
            seen = sorted(values.unique())
            raise ValueError(f"{flag}: no cell of {corpus} has {column}={value!r}; its values are "
                             f"{seen[:20]}{' ...' if len(seen) > 20 else ''}")


def check_model_and_corpus(model_dir, corpus, layer: int):
    """The corpus manifest, model config and vocabulary, once the model folder, the layer and the
    corpus' vocabulary (the model's own) are checked."""
    config = read_model_config(model_dir)
    manifest = read_manifest(corpus)
    check_corpus_vocab(config, manifest, corpus=corpus)
    hidden_state_index(layer, config.num_hidden_layers)
    return manifest, config, model_vocab(config)


def read_cells(corpus, cell_ids: list[str]):
    """The tokens of some cells (one shard at a time, filtered while reading), in corpus order."""
    wanted = pa.array(list(cell_ids), pa.string())
    tables = [pq.read_table(p, columns=["cell_id", "input_ids", "length"], filters=[("cell_id", "in", wanted)])
              for p in shard_paths(corpus)]
    return pa.concat_tables(tables)
