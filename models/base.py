"""The removal-model interface.

A model is a class with a frozen :class:`ModelSpec` (what it needs) and ``predict(TileInputs) -> TileResult``.
Parameters are a pydantic model (``Params``, unknown keys rejected) so a YAML typo fails loudly. Handles must be
picklable and load weights lazily (once per worker) so dask.distributed can ship them; GPU models override
``predict_batch`` to run several tiles at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict

from cloudfree.pipeline.contract import TileInputs, TileResult


#: ``ModelSpec.experimental`` of a model whose shipped weights do not beat the ``mean-fill`` floor.
BELOW_MEAN_FILL = ("its shipped weights do not beat the mean-fill floor (a constant fill with the clear pixels' mean) "
                   "on the real Romania evaluation (tests/test_floors.py, docs/evaluation.md)")


@dataclass(frozen=True)
class ModelSpec:
    """What a model declares about itself; the runner reads it instead of duplicating arguments.

    Attributes:
        bands: the Sentinel-2 bands it needs (others are passed through untouched if present).
        level: processing level it was built for (``"L1C"``, ``"L2A"`` or ``"any"``).
        needs_reference: it cannot run without at least one temporal reference.
        needs_sar: it cannot run without Sentinel-1.
        accepts_sar: it uses Sentinel-1 when the runner can give it (``needs_sar`` implies it): the runner then
            loads one SAR scene per optical date (target first) on the output grid and fills ``TileInputs.sar``.
        sar_units: the convention ``TileInputs.sar`` arrives in: ``"linear"`` power, or ``"db"`` (sigma0 dB clipped
            to [-25, 0], the SEN12MS-CR convention).
        max_references: how many references it can use (0 = none).
        halo: receptive-field radius in pixels; tiles are padded by this much on each side.
        description: one line for ``cloudfree models``.
        weights: file name of its weights (None for models without learned weights).
        scene_context: the runner calls ``fit_scene`` once per target on a coarse whole-scene sample and passes
            the result to every tile as ``TileInputs.context``.
        experimental: empty for a usable model; otherwise why it is not shipped as usable (e.g. its weights do not
            beat the ``mean-fill`` floor, tests/test_floors.py). ``cloudfree run`` refuses such a model unless
            ``model.allow_experimental`` is set (:func:`cloudfree.models.registry.check_usable`).
    """

    bands: tuple[str, ...]
    level: Literal["L1C", "L2A", "any"] = "any"
    needs_reference: bool = False
    needs_sar: bool = False
    accepts_sar: bool = False
    sar_units: Literal["linear", "db"] = "linear"
    max_references: int = 0
    halo: int = 0
    description: str = ""
    weights: str | None = None
    scene_context: bool = False
    experimental: str = ""


class ModelParams(BaseModel):
    """Base for a model's parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class RemovalModel(Protocol):
    name: ClassVar[str]
    spec: ClassVar[ModelSpec]
    params: ModelParams

    def predict(self, tile: TileInputs) -> TileResult: ...

    def predict_batch(self, tiles: Sequence[TileInputs]) -> list[TileResult]: ...


class RemovalModelBase(ABC):
    """Convenience base: stores validated params, loops ``predict`` for ``predict_batch``."""

    name: ClassVar[str] = ""
    spec: ClassVar[ModelSpec]
    Params: ClassVar[type[ModelParams]] = ModelParams

    def __init__(self, params: ModelParams | dict | None = None) -> None:
        if params is None or isinstance(params, dict):
            params = self.Params(**(params or {}))
        self.params = params

    @abstractmethod
    def predict(self, tile: TileInputs) -> TileResult:
        """Restore one tile."""

    def predict_batch(self, tiles: Sequence[TileInputs]) -> list[TileResult]:
        return [self.predict(t) for t in tiles]

    def fit_scene(self, sample: TileInputs) -> dict[str, Any]:
        """Scene-level statistics from a coarse whole-scene sample (only called if ``spec.scene_context``)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


def keep_target_and_mark_nodata(out, source, conf, target, keep, valid) -> None:
    """In place: pixels in ``keep`` take the target's own values (``SOURCE_TARGET``, confidence 1; pass
    ``keep=None`` to keep none), pixels outside ``valid`` become nodata (NaN, ``SOURCE_NODATA``, confidence 0).
    The last step of every model that restores only the cloudy pixels of a tile."""
    import numpy as np

    from cloudfree.pipeline.contract import SOURCE_NODATA, SOURCE_TARGET

    if keep is not None:
        np.copyto(out, target, where=keep[None])
        source[keep] = SOURCE_TARGET
        conf[keep] = 1.0
    np.copyto(out, np.float32(np.nan), where=~valid[None])
    source[~valid] = SOURCE_NODATA
    conf[~valid] = 0.0
