"""Checkpoint state: a Hugging Face model folder plus the trainer state, versioned.

    checkpoint/
      model/                config.json (+ vocabulary), model.safetensors: loads in stock transformers
      trainer_state.pt      optimizer, scheduler, step, epoch, RNG, config, vocabulary hash, MLflow run id,
                            and for pretraining the data position (epoch, consumed cells, masking RNG per rank)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from geneformer_ray.data.vocab import Vocabulary
from geneformer_ray.models.folders import save_model

STATE_VERSION = 1
STATE_FILE = "trainer_state.pt"


def save_checkpoint(directory: str | Path, *, model, optimizer, scheduler, vocab: Vocabulary, progress: dict,
                    config: dict, tracking_run_id: str | None, data: dict | None = None) -> Path:
    directory = Path(directory)
    save_model(model, directory / "model", vocab=vocab)
    state = {
        "version": STATE_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": dict(progress),  # step, epoch, ...
        "torch_rng": torch.get_rng_state(),
        "vocab_sha256": vocab.sha256,
        "config": config,
        "tracking_run_id": tracking_run_id,
        "data": _tensors(data),  # the data position: plain values and tensors only (loaded with weights_only)
    }
    torch.save(state, directory / STATE_FILE)
    return directory


def _tensors(value):
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def load_checkpoint(directory: str | Path, *, model, optimizer, scheduler, vocab: Vocabulary, weights: dict | None = None) -> dict:
    """Restore model weights, optimizer and scheduler in place; returns the saved state (progress, run id).
    ``weights``: the state dict to load instead of ``model/model.safetensors`` (e.g. with LoRA adapters)."""
    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{directory}: trainer state version {state.get('version')} is not {STATE_VERSION}; it was written by another release")
    if state["vocab_sha256"] != vocab.sha256:
        raise ValueError(f"{directory}: checkpoint vocabulary sha256 {state['vocab_sha256'][:12]} differs from {vocab.name} ({vocab.sha256[:12]}); "
                         "resume with the vocabulary it was trained with")
    weights = load_file(directory / "model" / "model.safetensors") if weights is None else weights
    target = getattr(model, "module", model)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{directory}: checkpoint weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state
