"""Model folders in the Hugging Face layout: load (ours or a published Geneformer checkpoint), save,
the vocabulary a model was trained with, and the checks that a corpus fits it.

    model, vocab = load_model("path/to/Geneformer-V2-104M")     # config.json + model.safetensors / pytorch_model.bin
    save_model(model, "out/model", vocab="gc30M")               # config.json (+ vocabulary) + model.safetensors
    config, vocab = resolve_model_config(init_from=None, flavour="tiny", manifest=manifest, corpus="corpus/")

Saved models carry their vocabulary (name + sha256) in ``config.json``; stock
``transformers.BertForMaskedLM.from_pretrained`` ignores the extra keys and loads them unchanged.
No network access: a path only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig, BertForMaskedLM

from geneformer_ray.data.corpus import check_vocab
from geneformer_ray.data.vocab import PRESETS, Vocabulary, load_vocab
from geneformer_ray.models.flavours import VOCAB_HASH_KEY, VOCAB_NAME_KEY, bert_config


def read_model_config(path: str | Path, *, what: str = "--model"):
    """A model folder's ``config.json`` (transformers' config object), or a clear error naming ``what``."""
    if not (Path(path) / "config.json").exists():
        raise ValueError(f"{what} {path} is not a model folder (no config.json); pass a folder saved by geneformer-ray "
                         "(…/model) or a Geneformer checkpoint")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def resolve_model_config(*, init_from: str | Path | None, flavour: str, manifest: dict, corpus: str | Path):
    """The config of the model a run trains (a folder's, or a flavour's in the corpus' vocabulary when
    that is a preset), checked against the corpus; returns ``(config, vocabulary)``."""
    if init_from:
        config = read_model_config(init_from, what="model.init_from")
    else:
        name = manifest["vocab"]["name"]
        config = bert_config(flavour, name if name in PRESETS else None)
    check_corpus_vocab(config, manifest, corpus=corpus)
    return config, model_vocab(config)


def model_vocab(config, vocab: Vocabulary | str | None = None) -> Vocabulary:
    """The vocabulary a model was trained with: recorded in its config, or told, or known by size.

    Published Geneformer checkpoints record nothing; their vocabulary size identifies them
    (25,426: gc30M; 20,275: gc104M).
    """
    recorded = getattr(config, VOCAB_HASH_KEY, None)
    if vocab is not None:
        vocab = load_vocab(vocab)
        if recorded and recorded != vocab.sha256:
            raise ValueError(
                f"the model was trained with vocabulary {getattr(config, VOCAB_NAME_KEY, '?')} (sha256 {recorded[:12]}), "
                f"not {vocab.name} (sha256 {vocab.sha256[:12]}); pass the model's own vocabulary"
            )
    elif recorded:
        name = getattr(config, VOCAB_NAME_KEY, None)
        vocab = load_vocab(name) if name in ("gc30M", "gc104M") else None
        if vocab is None or vocab.sha256 != recorded:
            raise ValueError(f"the model's vocabulary {name} (sha256 {recorded[:12]}) is not a preset; pass vocab=PATH")
    else:
        by_size = {load_vocab(v).num_tokens: v for v in ("gc30M", "gc104M")}
        if config.vocab_size not in by_size:
            raise ValueError(f"a model with {config.vocab_size:,} tokens matches no preset vocabulary; pass vocab=PATH")
        vocab = load_vocab(by_size[config.vocab_size])
    if config.vocab_size != vocab.num_tokens:
        raise ValueError(f"the model has {config.vocab_size:,} token embeddings but vocabulary {vocab.name} has {vocab.num_tokens:,}")
    return vocab


def load_model(path: str | Path, *, vocab: Vocabulary | str | None = None, model_class=None, **kwargs):
    """Load a checkpoint folder (ours or a published Geneformer one: ``config.json`` + ``model.safetensors``
    or ``pytorch_model.bin``). Returns ``(model, vocabulary)``. No network access: a path only; ``kwargs``
    go to ``from_pretrained``."""
    path = Path(path)
    config = read_model_config(path, what=str(path))
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ValueError(f"{path} has a config.json but no model.safetensors or pytorch_model.bin")
    vocab = model_vocab(config, vocab)
    model = (model_class or BertForMaskedLM).from_pretrained(path, local_files_only=True, **kwargs)
    return model, vocab


def save_model(model, path: str | Path, *, vocab: Vocabulary | str) -> Path:
    """Save in Hugging Face format (safetensors) with the vocabulary recorded in config.json."""
    vocab = load_vocab(vocab)
    model_vocab(model.config, vocab)  # refuses saving under a vocabulary the model does not have
    setattr(model.config, VOCAB_NAME_KEY, vocab.name)
    setattr(model.config, VOCAB_HASH_KEY, vocab.sha256)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(path, safe_serialization=True)
    (path / "geneformer_vocab.json").write_text(json.dumps(vocab.describe(), indent=2) + "\n")
    return path


def check_corpus_vocab(model_or_config, manifest: dict, *, corpus: str | Path = "corpus") -> None:
    """Refuse to train or infer on a corpus tokenized with another vocabulary than the model's."""
    config = getattr(model_or_config, "config", model_or_config)
    check_vocab(manifest, model_vocab(config), corpus=corpus)



def publish_model(model_dir: str | Path, target: Path) -> Path:
    """Copy a model folder to a fixed path (checkpoint folder names change every run), atomically."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
