"""Training machinery shared by every learned removal model.

* :mod:`cloudfree.pipeline.training.api` -- the :class:`~cloudfree.pipeline.training.api.TrainableModel` protocol a model implements
  (build the network, the loss of a batch, an optional stage schedule) and the batch layout;
* :mod:`cloudfree.pipeline.training.datasets` -- SEN12MS-CR / SEN12MS-CR-TS / AllClear readers and the STAC-catalog pair
  builder (real transplanted cloud masks or simulated clouds; real, simulated or no SAR);
* :mod:`cloudfree.pipeline.training.loop` -- seed, progress bar, checkpoints, resume, JSON-lines metrics, validation split,
  export with a model card (``cloudfree train``);
* :mod:`cloudfree.models._weights` -- safetensors save/load with the input convention, sha256, model cards, lazy
  once-per-process network cache.

A model makes itself trainable with a ``trainable()`` classmethod on its registered class.
"""

from __future__ import annotations

from cloudfree.pipeline.errors import ConfigError


def get_trainable(name: str):
    """The :class:`TrainableModel` of registered model ``name``."""
    from cloudfree.models.registry import get_model_class

    cls = get_model_class(name)
    if not hasattr(cls, "trainable"):
        from cloudfree.models.registry import available_models

        learned = [n for n, c in available_models().items() if hasattr(c, "trainable")]
        raise ConfigError(f"model {name!r} has no learned weights to train; trainable models: {', '.join(learned)}")
    return cls.trainable()
