"""Every private (underscore) API of a third-party library that cloudfree uses, in one place.

Each entry names the distribution, the module, the names used, the version it was checked on and why no public
API does the job. ``pyproject.toml`` bounds these distributions from above (the next minor release is not
assumed to keep them), and :func:`check` (run by ``tests/test_private_api.py``) fails naming the entry when an
internal moves, is renamed or changes its signature, so an upgrade breaks in one clear test, not mid-run.

Public APIs used instead where one exists: ``odc.geo.cog.save_cog_with_dask`` builds every COG's tile
compression graph (``stages/cog.py``; its own file writer is not used: it pads the image to a multiple of
``2**levels``, 1098 -> 1100 px on a 29RKH-sized grid, measured in the issue-21 note), ``tqdm.dask.TqdmCallback``
is the progress bar (``pipeline/progress.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateAPI:
    distribution: str
    module: str
    names: tuple[str, ...]
    checked_on: str
    used_in: str
    why: str


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "dask", "dask._task_spec", ("Task", "TaskRef", "DataNode", "convert_legacy_graph"), "2026.8.0",
        "stages/cog.py, stages/remove.py, pipeline/composite.py",
        "tile, spill and gate tasks are written straight into one graph layer; dask.delayed calls re-optimise the "
        "graph once per call (2.2 s of the 16x bench scene's main thread). dask has no public task-spec module.",
    ),
    PrivateAPI(
        "odc-geo", "odc.geo.cog._tifffile", ("compute_cog_spec", "_make_empty_cog", "_patch_hdr",
                                              "_compress_cog_tile", "_mk_tile_compressor",
                                              "_norm_compression_tifffile", "geotiff_metadata"), "0.5.3",
        "stages/cog.py (_unpadded, _assemble_cog, bound_lookahead, one_tile, write_cog_array)",
        "save_cog_with_dask(dst='') gives the header and per-tile compression graph; the header is patched with "
        "the tile offsets (_patch_hdr) when the parts are assembled in order, compute_cog_spec is called with "
        "max_pad=0 (no padding of the grid), and the tile compressions are found in the graph to bound the read "
        "look-ahead. A one-tile image (a small target) is written without a graph by the same calls "
        "(_norm_compression_tifffile, _make_empty_cog, _mk_tile_compressor, _patch_hdr), so its bytes are the "
        "streaming writer's; its header reuses the grid's GeoTIFF tags (geotiff_metadata, patched like "
        "compute_cog_spec) for every layer of a target.",
    ),
    PrivateAPI(
        "odc-loader", "odc.loader._builder", ("_dask_open_reader",), "0.6.5",
        "stages/cog.py (inline_reader_opens)",
        "odc-stac's reader-open tasks are inlined into the chunk reads, so every read is its own graph root and "
        "blocks are reduced as they arrive (memory flat with the area).",
    ),
    PrivateAPI(
        "odc-stac", "odc.stac._mdtools", ("StacAuxReader",), "0.5.3",
        "stages/load.py (SigningRioDriver)",
        "the signing reader driver subclasses odc-loader's public RioDriver and needs the aux reader odc-stac "
        "gives its own default driver; odc-stac does not export it.",
    ),
)


def _signature_problems() -> list[str]:
    """The call shapes cloudfree relies on, beyond the names existing."""
    problems = []
    tf = importlib.import_module("odc.geo.cog._tifffile")
    if "max_pad" not in inspect.signature(tf.compute_cog_spec).parameters:
        problems.append("odc.geo.cog._tifffile.compute_cog_spec no longer takes max_pad (stages/cog.py _unpadded)")
    if "compute_cog_spec" not in tf._make_empty_cog.__code__.co_names:
        problems.append("odc.geo.cog._tifffile._make_empty_cog no longer calls compute_cog_spec by module name: "
                        "stages/cog.py _unpadded would stop removing the padding")
    if "sample_idx" not in inspect.signature(tf._mk_tile_compressor).parameters:
        problems.append("odc.geo.cog._tifffile._mk_tile_compressor no longer takes sample_idx "
                        "(stages/cog.py write_cog_array)")
    if "geotiff_metadata" not in tf._make_empty_cog.__code__.co_names:
        problems.append("odc.geo.cog._tifffile._make_empty_cog no longer calls geotiff_metadata by module name: "
                        "stages/cog.py write_cog_array would stop reusing a grid's GeoTIFF tags")
    n = len(inspect.signature(tf._patch_hdr).parameters)
    if n != 5:
        problems.append(f"odc.geo.cog._tifffile._patch_hdr takes {n} arguments, stages/cog.py passes 5")
    ts = importlib.import_module("dask._task_spec")
    for attr in ("substitute", "dependencies", "func"):
        if not hasattr(ts.Task, attr):
            problems.append(f"dask._task_spec.Task has no {attr!r} (stages/cog.py)")
    return problems


def check() -> list[str]:
    """Problems with the private APIs in the installed versions (empty: all there, as checked)."""
    from importlib.metadata import version

    problems = []
    for api in PRIVATE_APIS:
        try:
            mod = importlib.import_module(api.module)
        except ImportError as exc:
            problems.append(f"{api.module} ({api.distribution} {version(api.distribution)}, checked on "
                            f"{api.checked_on}) cannot be imported: {exc}; used in {api.used_in}")
            continue
        missing = [n for n in api.names if not hasattr(mod, n)]
        if missing:
            problems.append(f"{api.module} ({api.distribution} {version(api.distribution)}, checked on "
                            f"{api.checked_on}) lacks {missing}; used in {api.used_in}")
    if not problems:
        problems += _signature_problems()
    return problems
