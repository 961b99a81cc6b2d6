"""Cloud-removal models: one file per model, each registered in :mod:`cloudfree.models.registry`."""

from cloudfree.models.base import ModelSpec, RemovalModel
from cloudfree.models.registry import available_models, build_model, get_model_class, register

__all__ = ["ModelSpec", "RemovalModel", "available_models", "build_model", "get_model_class", "register"]
