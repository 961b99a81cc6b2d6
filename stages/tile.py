"""Tile stage: a tile plan with a halo over the output grid.

Each output tile has a disjoint *core* (the pixels it writes) and a *read* window padded by the model's halo
(clipped at the grid edge). Cores cover the grid exactly once: no gaps, no double writes.
"""

from __future__ import annotations

from cloudfree.pipeline.contract import TileWindow
from cloudfree.pipeline.errors import ConfigError


def plan_tiles(shape: tuple[int, int], size: int, halo: int) -> list[TileWindow]:
    """Row-major tile plan over a grid of ``shape = (ny, nx)`` pixels."""
    ny, nx = shape
    if size <= 0 or halo < 0:
        raise ConfigError(f"tile size must be > 0 and halo >= 0, got size={size}, halo={halo}")
    if ny <= 0 or nx <= 0:
        raise ConfigError(f"cannot tile an empty grid of shape {shape}; check the AOI and grid.resolution")
    tiles = []
    for i, y0 in enumerate(range(0, ny, size)):
        for j, x0 in enumerate(range(0, nx, size)):
            y1, x1 = min(y0 + size, ny), min(x0 + size, nx)
            core = (slice(y0, y1), slice(x0, x1))
            read = (slice(max(0, y0 - halo), min(ny, y1 + halo)), slice(max(0, x0 - halo), min(nx, x1 + halo)))
            tiles.append(TileWindow((i, j), core, read))
    return tiles


def grid_of_tiles(tiles: list[TileWindow]) -> list[list[TileWindow]]:
    """Tiles arranged as rows (for assembling per-tile outputs with ``dask.array.block``)."""
    rows: dict[int, list[TileWindow]] = {}
    for t in tiles:
        rows.setdefault(t.index[0], []).append(t)
    return [sorted(r, key=lambda t: t.index[1]) for _, r in sorted(rows.items())]
