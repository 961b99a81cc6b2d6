"""Weights files of the generative models: safetensors + a JSON model card beside it holding the sha256.

``save_module`` writes ``NAME.safetensors`` atomically (temporary file + rename) with the network config in the
safetensors metadata, and returns its sha256; ``load_module`` checks the file against the ``sha256`` recorded in
the model card ``NAME.json`` before building the network, and refuses a mismatch with a clear error.
Callers cache the loaded module per process (once per worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pipeline.errors import ConfigError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_module(module: nn.Module, path: str | Path, config: dict[str, Any], model_name: str) -> str:
    """Write ``module``'s state dict (float32, contiguous) to ``path`` atomically; return the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"model": model_name, "config": json.dumps(config)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


def write_card(weights: str | Path, card: dict[str, Any]) -> Path:
    """Write the model card (JSON) next to ``weights`` atomically; ``card`` must hold ``sha256``."""
    if "sha256" not in card:
        raise ValueError("a model card needs the weights' sha256")
    p = card_path(weights)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p


def load_module(path: str | Path, build: Callable[[dict[str, Any]], nn.Module], model_name: str,
                check_hash: bool = True) -> nn.Module:
    """Build the network from the file's stored config and load its weights, after checking the sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{model_name}: weights {path} not found; train them with `cloudfree train {model_name}` or pass "
            f"params.weights"
        )
    if check_hash:
        card = card_path(path)
        if not card.exists():
            raise ConfigError(f"{model_name}: model card {card} (with the weights' sha256) is missing next to {path}")
        want = json.loads(card.read_text()).get("sha256")
        got = sha256_file(path)
        if want != got:
            raise ConfigError(
                f"{model_name}: weights {path} have sha256 {got[:12]}..., the model card says {str(want)[:12]}...; "
                f"the file is corrupt or does not belong to this card (retrain or restore both files)"
            )
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("model") != model_name:
        raise ConfigError(f"{model_name}: {path} holds weights of {meta.get('model')!r}, not {model_name!r}")
    module = build(json.loads(meta.get("config", "{}")))
    module.load_state_dict(load_file(str(path)))
    return module.eval()
