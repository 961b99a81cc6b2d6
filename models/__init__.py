"""Cloud-removal models: one file per model, each registered in :mod:`models.registry`."""

from models.base import ModelSpec, RemovalModel
from models.registry import available_models, build_model, get_model_class, register

__all__ = ["ModelSpec", "RemovalModel", "available_models", "build_model", "get_model_class", "register"]
