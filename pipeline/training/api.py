"""The small API a learned model implements to be trained by :mod:`cloudfree.pipeline.training.loop`.

A learned removal model (``models/<name>.py``) exposes ``trainable()`` (a classmethod) returning an object that
satisfies :class:`TrainableModel`. The loop owns everything else: data, seeding, batching, optimiser, checkpoints,
resume, metrics, validation, export and the model card. A model only builds its network and says what its loss is.

Batches are dicts of ``torch.Tensor`` (float32, values in the :class:`~cloudfree.models._weights.InputConvention`
scaling), with a leading batch axis ``B``:

=================  ===================  ===============================================================
key                shape                meaning
=================  ===================  ===============================================================
``target``         ``(B, C, H, W)``     the cloudy observation (reflectance 0-1)
``truth``          ``(B, C, H, W)``     the clear observation of the same date/place
``cloud_mask``     ``(B, H, W)``        1 where the target is cloudy (the mask the pipeline would give)
``references``     ``(B, T, C, H, W)``  other dates, nearest first (may be cloudy)
``ref_masks``      ``(B, T, H, W)``     1 where a reference is cloudy/nodata
``ref_dt``         ``(B, T)``           signed days from the target to each reference
``sar``            ``(B, T+1, P, H, W)``  S1 per date, index 0 = target date, scaled (dB + 25) / 25
``sar_present``    ``(B,)``             1 when the sample carries SAR, 0 when ``sar`` is zeros
=================  ===================  ===============================================================
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

from cloudfree.models._weights import InputConvention, Stage, single_stage  # noqa: F401  (re-exported for training)


@runtime_checkable
class TrainableModel(Protocol):
    """What ``cloudfree train`` needs from a learned model."""

    #: registry name of the removal model these weights serve.
    name: str
    #: input convention (bands, level, scaling, SAR polarisations) the network is trained on.
    convention: InputConvention
    #: how many reference dates a sample carries (0 for mono-temporal models).
    n_references: int

    def build_network(self, config: Mapping[str, Any]) -> Any:
        """A fresh ``torch.nn.Module`` for the network config (widths, depths...)."""

    def loss(self, net: Any, batch: Mapping[str, Any], stage: str) -> tuple[Any, dict[str, float]]:
        """``(scalar loss tensor, {term: float})`` for one batch in stage ``stage``."""

    def predict(self, net: Any, batch: Mapping[str, Any]) -> Any:
        """``(B, C, H, W)`` restored reflectance (validation metrics are computed on it)."""

    def stages(self, total_steps: int, lr: float) -> list[Stage]:
        """The stage schedule; ``[Stage("main", total_steps, lr)]`` for single-stage models."""
