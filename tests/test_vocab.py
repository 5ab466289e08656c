"""Ring 1: vocabularies - presets, hashing, the restricted unpickler, gene ID mapping."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from geneformer_ray.data.vocab import load_geneformer_dictionaries, load_vocab, safe_load_pickle

from conftest import tiny_vocab


def test_presets_match_geneformer_facts():
    v1, v2 = load_vocab("gc30M"), load_vocab("gc104M")
    assert (v1.num_tokens, len(v1.gene_tokens), v1.model_input_size, v1.adds_cls_eos) == (25_426, 25_424, 2048, False)
    assert (v2.num_tokens, len(v2.gene_tokens), v2.model_input_size, v2.adds_cls_eos) == (20_275, 20_271, 4096, True)
    assert v1.special_token_ids == {"<pad>": 0, "<mask>": 1}
    assert v2.special_token_ids == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert v2.max_genes_per_cell == 4094 and v1.max_genes_per_cell == 2048
    assert load_vocab("V1").sha256 == v1.sha256 and load_vocab("V2").sha256 == v2.sha256
    assert v1.sha256 != v2.sha256
    # the medians Geneformer uses are float64 values, kept exactly
    assert v1.gene_medians["ENSG00000000003"] == 2.001186019549122


def test_hash_is_stable_and_content_addressed(tmp_path):
    vocab = tiny_vocab()
    saved = vocab.save(tmp_path / "v")
    again = load_vocab(saved)
    assert again.sha256 == vocab.sha256 == json.loads((saved / "vocab.json").read_text())["sha256"]
    swapped = dict(vocab.token_ids)
    a, b = vocab.gene_tokens[:2]
    swapped[a], swapped[b] = swapped[b], swapped[a]
    changed = type(vocab)(name="tiny-v1", token_ids=swapped, gene_medians=vocab.gene_medians)
    assert changed.sha256 != vocab.sha256


def test_corrupt_saved_vocab_is_refused(tmp_path):
    saved = tiny_vocab().save(tmp_path / "v")
    meta = json.loads((saved / "vocab.json").read_text())
    meta["sha256"] = "0" * 64
    (saved / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt"):
        load_vocab(saved)


def _geneformer_pickles(vocab, folder):
    """Write dictionaries the way Geneformer does: numpy scalars inside plain dicts."""
    folder.mkdir()
    dump = lambda name, obj: pickle.dump(obj, open(folder / f"{name}_{vocab.name}.pkl", "wb"))
    dump("token_dictionary", {k: (np.int16(v) if v > 3 else v) for k, v in vocab.token_ids.items()})
    dump("gene_median_dictionary", {k: np.float64(v) for k, v in vocab.gene_medians.items()})
    dump("gene_name_id_dict", vocab.gene_names)
    dump("ensembl_mapping_dict", {**vocab.id_mapping, "ENSG_NOT_IN_VOCAB": "ENSG99999999999"})
    return folder


def test_geneformer_pickles_load_to_the_preset(tmp_path):
    preset = load_vocab("gc104M")
    folder = _geneformer_pickles(preset, tmp_path / "gc104M")
    loaded = load_vocab(folder)
    assert loaded.name == "gc104M"
    assert loaded.sha256 == preset.sha256
    assert loaded.gene_medians == preset.gene_medians
    assert loaded.id_mapping == preset.id_mapping  # entries pointing outside the vocabulary dropped
    assert loaded.model_input_size == 4096


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"ENSG1": _Evil()}, "not allowed"),
        (["ENSG1", "ENSG2"], "expected a dict"),
        ({"ENSG1": [1, 2]}, "not str -> str/int/float"),
        ({"ENSG1": True}, "not str -> str/int/float"),
    ],
)
def test_restricted_unpickler_refuses_anything_but_plain_dicts(tmp_path, payload, message):
    path = tmp_path / "token_dictionary_bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=message) as info:
        safe_load_pickle(path)
    assert str(path) in str(info.value)


def test_vocab_folder_without_medians_is_refused(tmp_path):
    folder = _geneformer_pickles(tiny_vocab(), tmp_path / "v")
    (folder / "gene_median_dictionary_tiny-v1.pkl").unlink()
    with pytest.raises(ValueError, match="gene_median_dictionary"):
        load_geneformer_dictionaries(folder)


def test_unknown_vocab_names_the_presets():
    with pytest.raises(ValueError, match="gc30M, gc104M"):
        load_vocab("gc999M")


def test_gene_id_mapping():
    v1, v2 = load_vocab("gc30M"), load_vocab("gc104M")
    assert v1.to_ensembl("CD3E") == "ENSG00000198851"
    assert v1.to_ensembl("cd3e") == "ENSG00000198851"  # case-insensitive symbols
    assert v1.to_ensembl("ENSG00000198851.12") == "ENSG00000198851"  # version suffix stripped
    assert v1.to_ensembl("NOT_A_GENE_XYZ") is None
    retired = next(k for k, v in v2.id_mapping.items() if k.startswith("ENSG") and k != v)
    assert v2.to_ensembl(retired) == v2.id_mapping[retired] != retired
    assert v2.to_ensembl(retired.lower()) == v2.id_mapping[retired]
    assert v2.to_ensembl("MS4A1") in v2.token_ids
