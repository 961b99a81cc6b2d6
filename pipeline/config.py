"""One typed, frozen config with a section per stage. Unknown keys are rejected, so a YAML typo fails loudly.

Environment overrides: ``CLOUDFREE_<SECTION>__<KEY>=value`` (e.g. ``CLOUDFREE_MODEL__NAME=dcp``), applied by
:func:`load_config` only (library code never reads the environment).
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloudfree.pipeline.errors import ConfigError


#: ``scheme://`` at the start of a value: a URL, never a local path (a Windows drive ``C:\\`` has no ``//``).
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: schemes ``output.dir`` may have besides a local folder (pipeline/outstore.py).
OBJECT_STORE_SCHEMES = ("s3", "gs", "az")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogConfig(_Section):
    """Where to search. ``kind`` picks the backend in :mod:`catalogs`."""

    kind: Literal["local", "stac-api", "planetary-computer", "earth-search", "sentinel-hub"] = "local"
    #: local: a static catalog (catalog.json / folder), a stac-geoparquet file; stac-api: the API root URL.
    url: str = "data/demo/catalog.json"
    collection: str = "sentinel-2-l2a"
    sar_collection: str | None = None
    #: HTTP timeout (s) and retries for API backends.
    timeout: float = Field(30.0, gt=0, le=3600)
    max_retries: int = Field(4, ge=0, le=100)
    #: exponential backoff base (s) between retries; jitter of the same size is added.
    backoff_factor: float = Field(0.5, ge=0)
    #: items per page asked from a STAC API.
    page_size: int = Field(100, ge=1, le=10000)
    #: href policy (catalogs/access.py): a remote catalog's assets are read only from public http(s)/s3/az/gs
    #: addresses, never from local paths (file://, /etc/passwd) or loopback/private/link-local hosts. True lets a
    #: trusted catalog point there (a test server on 127.0.0.1, an in-house API). Local catalogs are always allowed.
    allow_local_hrefs: bool = False
    #: planetary-computer: the SAS token endpoint (None: planetary_computer's default,
    #: https://planetarycomputer.microsoft.com/api/sas/v1/token) and how long (s) before its expiry a token is renewed.
    sas_url: str | None = None
    sas_refresh_margin: float = Field(300.0, ge=0)
    #: planetary-computer: a path-style blob endpoint (``http://host:port`` serving ``/<account>/<container>/...``,
    #: as Azurite does) whose hrefs are signed like ``<account>.blob.core.windows.net`` ones.
    blob_endpoint: str | None = None
    #: sentinel-hub: where Process API downloads are kept (None: $XDG_CACHE_HOME/cloudfree/sentinel-hub); a later
    #: load of the same item, band and grid reads them from there.
    cache_dir: str | None = None
    #: sentinel-hub: the largest side (pixels) of one Process API request; larger grids go in tiles (API limit 2500).
    sh_max_pixels: int = Field(2500, ge=16, le=2500)


class SelectionPolicy(_Section):
    """How references and SAR scenes are ranked for a target (stages/search.py).

    score = (w_time * exp(-dt / time_scale_days) + w_clear * clear_fraction + w_overlap * overlap
             + w_same_orbit * same_orbit + w_same_tile * same_tile) / sum of the weights, in [0, 1].
    """

    w_time: float = Field(1.0, ge=0)
    w_clear: float = Field(1.0, ge=0)
    w_overlap: float = Field(0.5, ge=0)
    w_same_orbit: float = Field(0.25, ge=0)
    w_same_tile: float = Field(0.25, ge=0)
    #: e-folding time (days) of the temporal-distance term.
    time_scale_days: float = Field(30.0, gt=0)
    #: references covering less than this fraction of the target footprint are dropped.
    min_overlap: float = Field(0.3, ge=0, le=1)
    #: references whose estimated clear fraction over the target is below this are dropped.
    min_clear_fraction: float = Field(0.0, ge=0, le=1)
    #: how the clear fraction is estimated: "metadata" (1 - eo:cloud_cover, scene-wide) or "scl" (share of the
    #: target's cloudy SCL pixels that are clear in the reference's SCL, read from overviews; falls back to
    #: metadata when an item has no readable SCL).
    clear_fraction: Literal["metadata", "scl"] = "metadata"
    #: bracket the target in time: when candidates exist on both sides, the best-scored reference before the
    #: target and the best-scored one after it are always kept (then the rest by score). A temporal model
    #: interpolates between them; with two references on the same side it can only extrapolate.
    bracket: bool = True
    #: Sentinel-1 scenes further than this from the target (days) are ignored.
    sar_max_days: float = Field(6.0, ge=0)
    #: how many SAR scenes to keep per target, best first (RTC before GRD, then nearest in time).
    max_sar: int = Field(1, ge=0)
    #: SAR scenes covering less than this fraction of the target are dropped.
    sar_min_overlap: float = Field(0.3, ge=0, le=1)

    @model_validator(mode="after")
    def _some_weight(self) -> "SelectionPolicy":
        if self.w_time + self.w_clear + self.w_overlap + self.w_same_orbit + self.w_same_tile <= 0:
            raise ValueError("search.policy needs at least one positive weight")
        return self


class SearchConfig(_Section):
    """Which targets and references to pick."""

    #: AOI as [minx, miny, maxx, maxy] in EPSG:4326, or a path to a GeoJSON file; None = the whole catalog.
    aoi: list[float] | str | None = None
    #: ISO 8601 interval "start/end"; None = any time.
    period: str | None = None
    #: explicit target item ids (then aoi/period only filter references).
    targets: list[str] = Field(default_factory=list)
    #: eo:cloud_cover range (percent) that makes an item a target.
    target_cloud_cover: tuple[float, float] = (5.0, 95.0)
    #: an item with eo:cloud_cover at most this is a candidate clear reference.
    reference_max_cloud_cover: float = Field(30.0, ge=0, le=100)
    #: how many references to keep per target, best first (with ``policy.bracket``, at least one on each side of
    #: the target when the catalog has one). More than two let a temporal model fit a robust line in time.
    #: Measured on the Romania hidden-date set (mean cloudy PSNR of `temporal`, 16 cases): 2 references by score
    #: 34.98 dB, 2 bracketing 35.13, 4 bracketing 36.11, 6 bracketing 36.20 dB (reference-replace 33.8 throughout).
    max_references: int = Field(4, ge=0, le=100)
    #: references further than this from the target (days) are ignored.
    max_days: float = Field(120.0, gt=0, le=3660)
    #: ranking weights and thresholds for references and SAR.
    policy: SelectionPolicy = Field(default_factory=SelectionPolicy)

    @field_validator("aoi")
    @classmethod
    def _bbox(cls, v: Any) -> Any:
        # minx > maxx is allowed: the bbox crosses the antimeridian (STAC API convention), e.g. [170, -20, -170, -10]
        # (a crossing box wider than 180 degrees is read as swapped coordinates, the likelier mistake)
        if isinstance(v, list) and (len(v) != 4 or v[0] == v[2] or v[1] >= v[3]
                                    or not all(-180 <= x <= 180 for x in v[::2])
                                    or not all(-90 <= y <= 90 for y in v[1::2])
                                    or (v[0] > v[2] and 360 - (v[0] - v[2]) > 180)):
            raise ValueError(f"aoi bbox must be [minx, miny, maxx, maxy] in degrees (EPSG:4326) with miny < maxy "
                             f"and minx < maxx (minx > maxx only for a box that crosses the antimeridian, e.g. [170, -20, -170, -10]), "
                             f"got {v}")
        return v

    @field_validator("period")
    @classmethod
    def _period(cls, v: str | None) -> str | None:
        if v is not None:
            from cloudfree.catalogs.base import parse_interval
            from cloudfree.pipeline.errors import CloudfreeError

            try:
                parse_interval(v)
            except CloudfreeError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("target_cloud_cover")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 100:
            raise ValueError(f"target_cloud_cover must be 0 <= min <= max <= 100, got {v}")
        return v


class GridConfig(_Section):
    """The output grid every input is loaded onto."""

    #: "EPSG:32633"; None = the target's own CRS (its UTM zone).
    crs: str | None = None
    resolution: float = Field(10.0, gt=0, le=10000)
    bands: list[str] = Field(default_factory=lambda: ["B02", "B03", "B04", "B08", "B11", "B12"])
    #: dask chunk (pixels) used while loading.
    chunk: int = Field(512, ge=16, le=16384)
    #: most output pixels (rows x columns) one target or composite tile may have; checked before any read, so an
    #: item declaring a huge grid (``proj:shape``) or a tiny ``resolution`` fails at once, naming the item. None =
    #: sized to this machine (:func:`default_max_pixels`: physical memory in bytes / 8, at least one full
    #: 10980 x 10980 Sentinel-2 tile).
    max_pixels: int | None = Field(None, ge=1)

    @field_validator("bands")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from cloudfree.pipeline.contract import S2_BANDS

        bad = [b for b in v if b not in S2_BANDS]
        if bad:
            raise ValueError(f"unknown Sentinel-2 bands {bad}; valid: {sorted(S2_BANDS)}")
        return v


class MaskConfig(_Section):
    """Cloud masks; methods are combined with OR, the continuous probability with max."""

    #: "auto" follows what the items carry: SCL where every item has SCL, else a Sen2Cor cloud probability
    #: (CLD / MSK_CLDPRB) where every item has one, else the spectral score; the output item records the choice
    #: (``cloudfree:mask_methods``).
    methods: list[Literal["auto", "cldprb", "scl", "spectral", "s2cloudless"]] = Field(
        default_factory=lambda: ["auto"])
    #: MSK_CLDPRB threshold (percent), 40 as in the PhyVLM-CR paper.
    cldprb_threshold: float = Field(40.0, ge=0, le=100)
    #: morphological closing then opening radius (10 m pixels) applied to the binary mask.
    closing_radius: int = Field(2, ge=0, le=100)
    opening_radius: int = Field(1, ge=0, le=100)
    #: refinement of a thresholded mask (cldprb, spectral; stages/masks.py): "weak-opening" (the opening removes
    #: only flagged pixels with probability below opening_keep_prob), "paper" (PhyVLM-CR: the opening removes every
    #: flagged speck smaller than its disk, however certain; costs real isolated cloud, see docs/masks.md) or
    #: "closing-only". Pixels an opening removes are never written as clear (own source code, item property).
    #: Default chosen by the measured precision/recall in docs/masks.md ("Default refinement (computed)").
    refinement: Literal["weak-opening", "paper", "closing-only"] = "weak-opening"
    #: "weak-opening": flagged pixels with cloud probability >= this (0-1) are never opened away (0.65: Sen2Cor's
    #: boundary between medium and high cloud probability).
    opening_keep_prob: float = Field(0.65, ge=0, le=1)
    #: SCL classes treated as unusable (3 shadow, 8/9 cloud, 10 cirrus; add 11 for snow).
    scl_classes: list[int] = Field(default_factory=lambda: [3, 8, 9, 10])
    #: dilation (pixels) of the final mask.
    dilation: int = Field(2, ge=0, le=100)
    #: 'spectral': cloud-score threshold T_cloud (eq. 14 of the cloud-attentive fusion paper) and NDSI snow limit.
    spectral_threshold: float = Field(0.2, ge=0, le=1)
    snow_ndsi: float = Field(0.6, ge=-1, le=1)
    #: 's2cloudless': probability threshold, averaging window and dilation (pixels, s2cloudless's own parameters).
    s2cloudless_threshold: float = Field(0.4, ge=0, le=1)
    s2cloudless_average_over: int = Field(4, ge=0)
    s2cloudless_dilation: int = Field(2, ge=0)
    #: the multi-temporal test for cloud and shadow the mask missed (stages/missed_cloud.py): pixels the mask calls
    #: clear but far brighter in blue than every clear reference (or far darker in NIR/SWIR) are added to the
    #: target's mask, and each reference's are found against the other references. Needs references.
    missed_cloud: bool = True


class CoregisterConfig(_Section):
    """Sub-pixel co-registration of references (and SAR) to the target (stages/coregister.py)."""

    enabled: bool = True
    #: estimated shifts larger than this (pixels, vector length) are recorded but not applied.
    max_shift_px: float = Field(3.0, gt=0, le=64)
    #: phase-correlation upsampling factor (1/upsample px resolution before the masked refinement).
    upsample: int = Field(100, ge=1)
    #: band the optical shift is estimated on.
    band: str = "B08"
    #: side (pixels) of the central window the shift is estimated on (one eager read of this size per image).
    window: int = Field(512, ge=64)
    #: minimum fraction of the window clear in both images; below it the reference is not shifted.
    min_clear_fraction: float = Field(0.05, ge=0, le=1)
    #: spline order used to apply the shift (1 bilinear, 3 cubic).
    order: int = Field(1, ge=0, le=5)
    #: estimated shifts shorter than this (pixels, vector length) are recorded but not applied: below the
    #: estimate's precision a resampling only blurs the reference, and it costs a second read of every reference.
    min_shift_px: float = Field(0.05, ge=0, le=1)


class TileConfig(_Section):
    size: int = Field(512, ge=16, le=16384)
    #: halo in pixels; None = the model's declared receptive field.
    halo: int | None = Field(None, ge=0)
    #: how overlapping tile predictions are merged (stages/mosaic.py): feathered or Hann-window blend over the
    #: halo, or "none" (halo discarded: each pixel from the tile whose core holds it). No effect when halo is 0.
    blend: Literal["feather", "hann", "none"] = "feather"


class ModelConfig(_Section):
    #: the pick of the default-model rule (pipeline/evaluation/report.py: best mean cloudy PSNR over the real
    #: Romania cases, none more than 1 dB below median-composite on any real case or on the simulated mean;
    #: docs/evaluation.md, "Default model (computed)"; tests/test_config.py checks the two agree).
    name: str = "median-composite"
    params: dict[str, Any] = Field(default_factory=dict)
    #: run a model `cloudfree models` lists as EXPERIMENTAL (e.g. weights that do not beat the mean-fill floor).
    allow_experimental: bool = False
    #: run a model on items of another processing level than its spec.level (e.g. L2A weights on L1C items):
    #: out of domain, logged as a warning instead of failing the target.
    allow_level_mismatch: bool = False


class OutputConfig(_Section):
    dir: Path = Path("outputs")
    compress: Literal["deflate", "zstd", "lzw"] = "deflate"
    blocksize: int = Field(512, ge=16, le=8192)
    quicklook: bool = True
    overwrite: bool = False
    #: pixels whose confidence is below this floor (0-1) get the ``low_confidence`` treatment; 0 = off.
    confidence_floor: float = Field(0.0, ge=0, le=1)
    #: best-available: the first clear reference pixel (else the target's own); nodata; keep: the model's value.
    low_confidence: Literal["best-available", "nodata", "keep"] = "best-available"
    #: id of the STAC Collection the outputs are published in (<dir>/collection.json, <dir>/catalog.json).
    collection: str = "cloudfree-outputs"
    #: write a Markdown/HTML run report with PNGs under <dir>/reports/<run id>/.
    report: bool = True

    #: the object-store root (``s3://bucket/prefix``, ``gs://``, ``az://``) when ``dir`` was given as one; then
    #: ``dir`` is the local work folder (``work_dir``) targets are computed in before they are published there.
    #: Set from ``dir``; see pipeline/outstore.py.
    store: str | None = None
    #: obstore config of the store (e.g. endpoint, access_key_id, secret_access_key, region), over the
    #: environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    storage_options: dict[str, str] = Field(default_factory=dict)
    #: local work folder of an object-store run (None: $XDG_CACHE_HOME/cloudfree/outstore/<hash of the URL>/<last
    #: part of the URL>: the catalog's description names it, as a local folder's name).
    work_dir: Path | None = None
    #: a store lock older than this (s) from another host is stale (same host: as soon as its process is gone).
    lock_stale_s: float = Field(6 * 3600.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _object_store_dir(cls, data):
        """``dir: s3://bucket/prefix`` (gs://, az://): ``store`` = the URL, ``dir`` = the local work folder."""
        if not isinstance(data, dict):
            return data
        v = data.get("dir")
        m = URL_SCHEME.match(str(v)) if isinstance(v, str) else None
        if m and m.group(1) in OBJECT_STORE_SCHEMES:
            import hashlib

            url = v.rstrip("/")
            if not re.match(r"^[a-z0-9]+://[^/]+", url):
                raise ValueError(f"output.dir {v!r}: give a bucket (and a prefix): {m.group(1)}://bucket/prefix")
            work = data.get("work_dir") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
                / "cloudfree" / "outstore" / hashlib.sha256(url.encode()).hexdigest()[:16] \
                / (re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1]).lstrip(".") or "root")
            data = {**data, "store": url, "dir": str(work), "work_dir": str(work)}
        return data

    @field_validator("dir", mode="before")
    @classmethod
    def _no_url_as_folder(cls, v):
        """A URL-looking ``output.dir`` is never taken as a local folder (``s3://b/x`` would become ``s3:/b/x``)."""
        m = URL_SCHEME.match(str(v)) if isinstance(v, str) else None
        if m:
            raise ValueError(
                f"{v!r} is a URL ({m.group(1)}://) of a kind outputs cannot be written to: use a local folder or an "
                f"object store ({', '.join(s + '://bucket/prefix' for s in OBJECT_STORE_SCHEMES)})")
        return v

    @field_validator("store")
    @classmethod
    def _known_store(cls, v):
        if v is not None:
            m = URL_SCHEME.match(v)
            if not m or m.group(1) not in OBJECT_STORE_SCHEMES:
                raise ValueError(f"{v!r}: not an object-store URL ({', '.join(OBJECT_STORE_SCHEMES)})")
        return v


class CompositeConfig(_Section):
    """Regional composites (pipeline/composite.py): one cloud-free image per MGRS tile and period."""

    #: median: per-pixel median of the clear observations; best-pixel: the clear observation with the lowest cloud
    #: probability; model: target-date reconstruction of the period's latest acquisition with the configured model.
    method: Literal["median", "best-pixel", "model"] = "median"
    #: acquisitions with a larger eo:cloud_cover are not used.
    max_cloud_cover: float = Field(100.0, ge=0, le=100)
    #: at most this many acquisitions per tile (least cloudy first): bounds memory and reads.
    max_items: int = Field(12, ge=1)


class RunConfig(_Section):
    scheduler: Literal["threads", "synchronous", "processes", "distributed"] = "threads"
    workers: int | None = Field(None, ge=1)
    #: per-worker memory limit for the distributed scheduler's own LocalCluster (not used with ``address``).
    memory_limit: str = "4GiB"
    #: with ``scheduler: distributed``: the address of a running dask scheduler (``tcp://host:8786``: a
    #: LocalCluster, ``dask scheduler`` + ``dask worker`` as in docker/docker-compose.yml, dask-gateway,
    #: Kubernetes); None = start a LocalCluster of ``workers`` processes for the run.
    address: str | None = None
    progress: bool = True
    #: targets (``cloudfree run``) or MGRS tiles (``cloudfree composite``) computed at the same time by one runner,
    #: each as its own graph. With ``scheduler: distributed`` the cluster runs the graphs side by side; with
    #: ``threads`` each unit gets its own pool of ``workers`` threads, so one unit's Python overlaps another's reads
    #: (small targets; same bytes; memory grows with the units in flight); other local schedulers use 1 (warned).
    concurrent_targets: int = Field(1, ge=1)
    #: glibc malloc arenas of this process (threads/synchronous schedulers; ``mallopt(M_ARENA_MAX)``). Worker
    #: threads free numpy blocks that other threads allocated; with glibc's default (8 arenas per core) the freed
    #: memory stays in per-thread arenas and peak RSS grew with the area (bench composite at 16x: 699 MB with
    #: glibc's default, 589 MB with 1 arena, at the same speed). 0 = leave glibc's default. Like
    #: ``MALLOC_ARENA_MAX``, which takes precedence when set.
    malloc_arenas: int = Field(1, ge=0)
    #: glibc's mmap threshold of this process in bytes (``mallopt(M_MMAP_THRESHOLD)``): blocks at least this large
    #: are mapped and unmapped on their own. 0 (default) = leave glibc's own (dynamic: it rises to the largest block
    #: freed, up to 32 MB, and such blocks are then reused from the heap); ``MALLOC_MMAP_THRESHOLD_`` wins when set.
    #: A fixed 1 MiB (the default for a while) mapped every 512 px band plane and tile temporary afresh: A/B in one
    #: run, bench phyvlm-cr scene 16x, 2 workers, loaded machine: 1 MiB 157 s, 61.9 s user + 44.9 s system CPU,
    #: 15.2 M page faults, 1457 MB peak RSS; glibc's default 136 s, 61.8 + 8.5 s, 0.46 M faults, 1350 MB; at 4x
    #: (2 runs each, alternated) glibc's default took 0.64x the time of 1 MiB at the same peak RSS.
    malloc_mmap_threshold: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _address_needs_distributed(self) -> "RunConfig":
        if self.address and self.scheduler != "distributed":
            raise ValueError(f"run.address {self.address!r} needs run.scheduler: distributed "
                             f"(got {self.scheduler!r})")
        return self


class Config(_Section):
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    tile: TileConfig = Field(default_factory=TileConfig)
    coregister: CoregisterConfig = Field(default_factory=CoregisterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    composite: CompositeConfig = Field(default_factory=CompositeConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _tile_vs_chunk(self) -> "Config":
        if self.output.blocksize % 16:
            raise ValueError(f"output.blocksize must be a multiple of 16, got {self.output.blocksize}")
        return self

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some keys of some sections changed: ``cfg.replace(model={"name": "dcp"})``."""
        data = self.model_dump()
        for sec, vals in sections.items():
            data[sec] = {**data[sec], **vals}
        return parse_config(data, source="override")


def parse_config(data: dict[str, Any] | None, *, source: str = "config",
                 env_vars: dict[tuple[str, ...], str] | None = None) -> Config:
    """Validate ``data``; a :class:`ConfigError` lists every problem with its key. ``env_vars`` maps a key path
    (``("search", "policy", "bracket")``) to the environment variable that set it: a problem under that path is
    blamed on the variable, not on ``source``."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        lines, from_env = [], 0
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            var = _env_var_for(loc, env_vars or {})
            from_env += var is not None
            lines.append(f"  {'.'.join(loc)}: {err['msg']}" + (f" (got {err.get('input')!r})" if err["type"] != "missing" else "")
                         + (f" [from environment variable {var}]" if var else ""))
        where = source
        if from_env == len(lines):
            where = "the CLOUDFREE_* environment overrides"
        elif from_env:
            where = f"{source} (with CLOUDFREE_* environment overrides)"
        raise ConfigError(f"{where} is invalid:\n" + "\n".join(lines) + "\nSee the README's config reference.") from None


def _env_var_for(loc: tuple[str, ...], env_vars: dict[tuple[str, ...], str]) -> str | None:
    """The environment variable that set ``loc`` or a key above it (None: it came from the file or a default)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in env_vars:
            return env_vars[loc[:n]]
    return None


#: prefix of the environment overrides; ``__`` separates nesting levels (as pydantic-settings' env_nested_delimiter).
ENV_PREFIX = "CLOUDFREE_"


def _env_overrides(prefix: str = ENV_PREFIX, environ: dict[str, str] | None = None,
                   ) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``CLOUDFREE_<SECTION>__<KEY>[__<SUBKEY>...]=value`` variables as a nested dict (any depth, e.g.
    ``CLOUDFREE_SEARCH__POLICY__BRACKET=false``), and which variable set which key path. Values are YAML (``10``,
    ``false``, ``[B02, B03]``); a date-like value stays the string it was written as. Variables without ``__``
    (``CLOUDFREE_API_KEY``) are not config. An unparsable value is a :class:`ConfigError` naming the variable
    (never echoing the value: it may hold a credential)."""
    out: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for key, val in sorted((environ if environ is not None else os.environ).items()):
        if not key.startswith(prefix) or "__" not in key:
            continue
        path = tuple(key[len(prefix):].lower().split("__"))
        if any(not p for p in path):
            raise ConfigError(f"environment variable {key}: empty key between '__' separators; write "
                              f"{prefix}<SECTION>__<KEY>, e.g. {prefix}SEARCH__POLICY__BRACKET=false")
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError as exc:
            why = getattr(exc, "problem", None) or type(exc).__name__
            mark = getattr(exc, "problem_mark", None)
            at = f" at column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"environment variable {key} is not valid YAML ({why}{at}); quote the value or fix "
                              "it (a string with ':' or a leading '[' or '{' needs quotes)") from None
        if isinstance(value, (date, datetime)):
            value = val.strip()  # YAML reads 2024-06-01 as a date; the config wants the string
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"environment variable {key} sets a key below {'.'.join(path[:i + 1])}, which "
                                  f"{origin.get(path[:i + 1], 'another variable')} sets to a value; unset one of them")
            node = nxt
        node[path[-1]] = value
        origin[path] = key
    return out, origin


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def default_max_pixels() -> int:
    """``grid.max_pixels`` when unset: physical memory in bytes / 8, at least one 10980 x 10980 Sentinel-2 tile
    (24 GB: 3.0 Gpx, 25 such tiles). Processing is chunked, so this bounds work and disk, not the memory of one
    pass; it stops a grid that could never finish here (an item declaring ``proj:shape [1000000, 1000000]``)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 16 * 2**30
    return max(int(phys // 8), 10980 * 10980)


#: config keys that hold local paths: relative ones in a config file are relative to that file's folder
PATH_KEYS = (("catalog", "url"), ("search", "aoi"), ("output", "dir"))


def relative_to_file(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with the relative local paths of :data:`PATH_KEYS` joined to ``folder`` (a config copied to
    another folder, or run from another working directory, still finds its catalog, AOI and output folder; the
    environment and the command line stay relative to the working directory). URLs, bboxes and absolute paths are
    left as they are."""
    import os

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for sec, key in PATH_KEYS:
        v = out.get(sec, {}).get(key) if isinstance(out.get(sec), dict) else None
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(os.path.expanduser(v)):
            out[sec][key] = os.path.normpath(folder / os.path.expanduser(v))
    return out


def load_config(path: str | Path | None = None, *, env: bool = True) -> Config:
    """Read a YAML config (None = defaults; relative paths in it are relative to its folder,
    :func:`relative_to_file`), apply the ``CLOUDFREE_SECTION__KEY[__SUBKEY...]`` environment
    overrides (:func:`_env_overrides`); problems with an override name the variable."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
        data = relative_to_file(data, p.resolve().parent)
    origin: dict[tuple[str, ...], str] = {}
    if env:
        over, origin = _env_overrides()
        data = _deep_merge(data, over)
    return parse_config(data, source=f"config file {path}" if path else "the default config", env_vars=origin)
