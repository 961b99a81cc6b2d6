"""Weights of learned models: save (safetensors, atomic), hash (sha256), model cards, lazy hash-checked loading,
and the training schedule a learned model declares (:class:`Stage`).

Owned by ``models`` so that a model imports only the contract, the errors, its own helpers and numeric libraries:
training (:mod:`cloudfree.pipeline.training`) imports this module, never the reverse.

A weights file carries, in its safetensors metadata, the **input convention** the network was trained on
(:class:`InputConvention`: bands, processing level, optical and SAR scaling). Loading compares it with what the
model is configured for and refuses a mismatch with :class:`~cloudfree.pipeline.errors.WeightsError` naming both sides, so a
network trained on L2A B02/B03/B04/B08 in [0, 1] is never silently fed L1C or other bands.

Networks are loaded **lazily, once per process** (:func:`cached_network`): the model object that dask pickles to its
workers holds only the path and the expected hash; the first tile a worker runs builds the network, checks the file's
sha256 against the expected one (:func:`expected_sha256`: for the shipped weights the sha256 recorded in
``models/weights/MANIFEST.json`` under version control, never the card beside the file; for other weights their
model card's), and keeps it in a per-process cache.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cloudfree.pipeline.errors import WeightsError
from cloudfree.pipeline.fileio import atomic_target as _atomic_target
from cloudfree.pipeline.fileio import file_sha256, write_json_atomic, write_text_atomic

#: Optical scaling every learned model here uses: L2A/L1C reflectance (DN / 10000) clipped to [0, 1], i.e. the
#: SEN12MS-CR(-TS)/AllClear convention "clip to [0, 10000], scale to [0, 1]".
OPTICAL_SCALING = "reflectance clip [0, 1] (= DN clip [0, 10000] / 10000)"
#: SAR scaling: backscatter in dB clipped to [-25, 0] and mapped to [0, 1] ((dB + 25) / 25).
SAR_SCALING = "sigma0 dB clip [-25, 0], (dB + 25) / 25"


@dataclass(frozen=True)
class InputConvention:
    """What a network's inputs must be. Stored in the weights file; checked at load time."""

    bands: tuple[str, ...]
    level: str = "L2A"
    optical_scaling: str = OPTICAL_SCALING
    sar_pols: tuple[str, ...] = ()
    sar_scaling: str = SAR_SCALING

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InputConvention":
        d = json.loads(text)
        return cls(tuple(d["bands"]), d["level"], d["optical_scaling"], tuple(d.get("sar_pols", ())),
                   d.get("sar_scaling", SAR_SCALING))

    def check(self, trained: "InputConvention", where: str) -> None:
        """Raise :class:`WeightsError` if ``trained`` (from the file) differs from this (the model's) convention."""
        problems = []
        if tuple(trained.bands) != tuple(self.bands):
            problems.append(f"bands {list(trained.bands)} (model configured for {list(self.bands)})")
        if trained.level != self.level and "any" not in (trained.level, self.level):
            problems.append(f"level {trained.level} (model configured for {self.level})")
        if trained.optical_scaling != self.optical_scaling:
            problems.append(f"optical scaling {trained.optical_scaling!r} (model uses {self.optical_scaling!r})")
        if trained.sar_pols and self.sar_pols and tuple(trained.sar_pols) != tuple(self.sar_pols):
            problems.append(f"SAR polarisations {list(trained.sar_pols)} (model uses {list(self.sar_pols)})")
        if trained.sar_pols and trained.sar_scaling != self.sar_scaling:
            problems.append(f"SAR scaling {trained.sar_scaling!r} (model uses {self.sar_scaling!r})")
        if problems:
            raise WeightsError(f"{where}: the weights were trained on {'; '.join(problems)}; retrain with "
                               "`cloudfree train` for this input convention or configure the model to match")


def save_weights(state_dict: Mapping[str, Any], path: str | Path, convention: InputConvention,
                 extra: Mapping[str, str] | None = None) -> str:
    """Write ``state_dict`` to ``path`` atomically; returns its sha256.

    ``.safetensors`` (the default format: no pickle, safe to load from untrusted sources) stores the convention in the
    file's metadata; any other suffix falls back to ``torch.save`` of ``{"state_dict", "metadata"}``.
    """
    import torch

    path = Path(path)
    meta = {"cloudfree:input": convention.to_json(), **{k: str(v) for k, v in (extra or {}).items()}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=meta)
        else:
            torch.save({"state_dict": tensors, "metadata": meta}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def read_weights(path: str | Path, expected_sha256: str | None, convention: InputConvention | None = None,
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """``(state_dict, metadata)`` of a weights file after checking its hash and input convention.

    Raises :class:`WeightsError` when the file is missing, its sha256 differs from ``expected_sha256`` (a corrupt
    or swapped file), or the convention stored in it differs from ``convention``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; train it with `cloudfree train` or point the model's "
                           "`weights` parameter at an existing file")
    if expected_sha256 is not None:
        got = file_sha256(path)
        if got != expected_sha256:
            raise WeightsError(f"weights file {path} has sha256 {got}, expected {expected_sha256} (from the weights "
                               "manifest / its model card / the model's weights_sha256 parameter); the file is corrupt or was replaced")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = blob["state_dict"], dict(blob.get("metadata", {}))
    if convention is not None:
        if "cloudfree:input" not in meta:
            raise WeightsError(f"weights file {path} records no input convention (bands/level/scaling); it was not "
                               "written by cloudfree's save_weights and cannot be checked")
        convention.check(InputConvention.from_json(meta["cloudfree:input"]), f"weights {path.name}")
    return state, meta


# -- lazy, once-per-process network cache ---------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def cached_network(key: tuple, build: Callable[[], Any]) -> Any:
    """The network for ``key`` in this process, built (and its weights read and checked) on first use only."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def cache_size() -> int:
    return len(_CACHE)


# -- model cards ----------------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """What a weights file is: written next to it as ``<name>.card.json`` and ``<name>.card.md``."""

    model: str
    weights_file: str
    sha256: str
    size_bytes: int
    convention: InputConvention
    data: dict[str, Any]
    config: dict[str, Any]
    steps: int
    epochs_equivalent: float
    wall_seconds: float
    metrics: dict[str, Any]
    licence: str = ("weights: Apache-2.0 (this project); trained on Copernicus Sentinel data "
                    "(\"Contains modified Copernicus Sentinel data\")")
    notes: list[str] = field(default_factory=list)
    #: what training saw, counted honestly (distinct truth images and pixels, donors, samples drawn).
    seen: dict[str, Any] = field(default_factory=dict)
    #: held-out evaluation (e.g. romania-hidden real pixels) next to the floors mean-fill and reference-replace.
    heldout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["convention"] = asdict(self.convention)
        return d

    def to_markdown(self) -> str:
        c = self.convention
        lines = [f"# Model card: {self.model}", "",
                 f"- weights: `{self.weights_file}` ({self.size_bytes / 1e6:.2f} MB), sha256 `{self.sha256}`",
                 f"- inputs: bands {', '.join(c.bands)}, level {c.level}, optical {c.optical_scaling}"
                 + (f", SAR {'/'.join(c.sar_pols)} {c.sar_scaling}" if c.sar_pols else ""),
                 f"- training: {self.steps} steps, wall time {self.wall_seconds:.0f} s"
                 + (f"; {self.seen['samples_drawn']} samples drawn ({self.seen['pixel_samples']:,} pixel-samples) "
                    f"from {self.seen['truth_images']} distinct clear images ({self.seen['truth_pixels']:,} distinct "
                    f"pixels) x {self.seen['cloud_donors']} cloud donors" if self.seen.get("samples_drawn") else
                    f" (~{self.epochs_equivalent:.2f} passes over the truth x donor combinations)"),
                 f"- licence: {self.licence}", "", "## Data", ""]
        lines += [f"- **{k}**: {v}" for k, v in self.data.items()]
        lines += ["", "## Config", "", "```json", json.dumps(self.config, indent=2, sort_keys=True), "```", "",
                  "## Metrics (validation split, reflectance 0-1)", ""]
        lines += [f"- {k}: {v}" for k, v in self.metrics.items()]
        if self.heldout:
            lines += ["", "## Held-out evaluation against the floors", ""]
            lines += [f"- {k}: {v}" for k, v in self.heldout.items()]
        if self.notes:
            lines += ["", "## Notes and limits", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def card_paths(weights: str | Path) -> tuple[Path, Path]:
    w = Path(weights)
    stem = w.name.split(".")[0]
    return w.with_name(f"{stem}.card.json"), w.with_name(f"{stem}.card.md")


def write_model_card(card: ModelCard, weights: str | Path) -> tuple[Path, Path]:
    jpath, mpath = card_paths(weights)
    write_json_atomic(card.to_dict(), jpath)
    write_text_atomic(card.to_markdown(), mpath)
    return jpath, mpath


#: The weights shipped with cloudfree and their manifest: the expected sha256 of every file in this folder, under
#: version control. A shipped file is checked against the manifest only: a replaced file *and* card (the card sits
#: beside the file and can be swapped with it) are refused.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "MANIFEST.json"


def manifest_path(weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    return Path(weights_dir) / MANIFEST


def read_manifest(weights_dir: str | Path = WEIGHTS_DIR) -> dict[str, str]:
    """``{file name: sha256}`` of the shipped weights (empty when there is no manifest)."""
    p = manifest_path(weights_dir)
    if not p.is_file():
        return {}
    try:
        return dict(json.loads(p.read_text())["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"weights manifest {p} is unreadable ({exc}); restore it from version control") from None


def shipped_sha256(weights: str | Path, weights_dir: str | Path = WEIGHTS_DIR) -> str | None:
    """The manifest's sha256 for ``weights`` when the file lies in the shipped weights folder ``weights_dir``; None
    for weights elsewhere (a user's own training run: checked against its card). A file in the folder that the
    manifest does not list is refused (:class:`WeightsError`)."""
    w = Path(weights).resolve()
    if w.parent != Path(weights_dir).resolve():
        return None
    sha = read_manifest(weights_dir).get(w.name)
    if sha is None:
        raise WeightsError(f"weights file {w} is in the shipped weights folder but not in its {MANIFEST}, so its "
                           "sha256 cannot be checked; record it with `python -m cloudfree.models._weights "
                           f"{w}` (after checking the file) and commit the manifest")
    return sha


def expected_sha256(weights: str | Path, weights_dir: str | Path = WEIGHTS_DIR) -> str | None:
    """The sha256 a weights file must have: the manifest's for a shipped file, else its model card's (None: no
    card)."""
    return shipped_sha256(weights, weights_dir) or card_sha256(weights)


def update_manifest(paths, weights_dir: str | Path = WEIGHTS_DIR) -> dict[str, str]:
    """Record the sha256 of ``paths`` (files in ``weights_dir``) in its manifest, atomically; returns the manifest.
    Run after shipping new weights (``cloudfree train --export models/weights/<name>.safetensors`` does it)."""
    d = Path(weights_dir).resolve()
    files = read_manifest(d)
    for p in paths:
        p = Path(p).resolve()
        if p.parent != d:
            raise WeightsError(f"{p} is not in the weights folder {d}; only shipped weights go into {MANIFEST}")
        files[p.name] = file_sha256(p)
    write_json_atomic({"about": "sha256 of every weights file shipped in this folder; checked before loading "
                                "(models/_weights.py expected_sha256); update with "
                                "`python -m cloudfree.models._weights FILE...`",
                       "sha256": dict(sorted(files.items()))}, manifest_path(d))
    return files


def card_sha256(weights: str | Path) -> str | None:
    """The sha256 recorded in the model card next to ``weights`` (None without a card)."""
    jpath, _ = card_paths(weights)
    if not jpath.is_file():
        return None
    return json.loads(jpath.read_text())["sha256"]


# -- the training schedule a learned model declares (run by cloudfree.pipeline.training.loop) ----------------
@dataclass(frozen=True)
class Stage:
    """One phase of training: ``steps`` optimiser steps at learning rate ``lr`` on ``params(net)`` (None = all;
    or a list of ``{"params": [...], "lr_scale": 0.1}`` groups for per-module learning rates),
    with the model's loss called as ``loss(net, batch, stage=name)``. ``lr_decay_every`` halves the rate every that
    many steps after ``lr_decay_after`` (CA-MTCR's schedule); 0 disables decay."""

    name: str
    steps: int
    lr: float
    params: Callable[[Any], Iterable[Any]] | None = None
    lr_decay_after: int = 0
    lr_decay_every: int = 0

    def lr_at(self, step_in_stage: int) -> float:
        if self.lr_decay_every <= 0 or step_in_stage < self.lr_decay_after:
            return self.lr
        return self.lr * 0.5 ** (1 + (step_in_stage - self.lr_decay_after) // self.lr_decay_every)

def single_stage(total_steps: int, lr: float) -> list[Stage]:
    return [Stage("main", total_steps, lr)]


if __name__ == "__main__":  # python -m cloudfree.models._weights models/weights/x.safetensors ...
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m cloudfree.models._weights WEIGHTS_FILE...  (records their sha256 in "
                 f"{manifest_path()})")
    for name, sha in update_manifest(sys.argv[1:]).items():
        print(f"{sha}  {name}")


# -- the one lazy-weights mechanism of the learned models ------------------------------------------------------
def pick_device(name: str, who: str = "model"):
    """``torch.device`` for a configured device name: ``auto`` (CUDA when present, else CPU), ``cpu`` or
    ``cuda[:N]``; CUDA asked for on a machine without it is a :class:`ConfigError` naming ``who`` and the fix."""
    import torch

    from cloudfree.pipeline.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{who}: device {name!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


class LazyWeights:
    """Mixin of every learned model (:class:`cloudfree.models._learned.LearnedModel`, CM-CR, diffusion-enhancement):
    its network is read from a hash-checked weights file on first use, once per process and device
    (:func:`cached_network`), and never pickled with the model: the model holds no network, so dask ships the model
    handle and each worker loads the weights itself.

    The model sets ``weights_file`` (its shipped file under ``models/weights/``) and implements
    ``load_network(path, sha256)`` (read with :func:`read_weights`, build, load the state; raise
    :class:`WeightsError`/``ModelError`` naming the fix); its ``params`` have ``weights`` (None: the shipped file),
    ``device`` and optionally ``weights_sha256``."""

    weights_file: str = ""

    @property
    def weights_path(self) -> Path:
        return Path(self.params.weights) if self.params.weights else WEIGHTS_DIR / self.weights_file

    def expected_sha256(self) -> str | None:
        """The ``weights_sha256`` parameter, else the manifest's (shipped weights: under version control, never the
        card beside the file), else the model card's; None: no hash to check against, or no file (``load_network``
        then reports it missing)."""
        given = getattr(self.params, "weights_sha256", None)
        if given or not self.weights_path.is_file():
            return given
        return expected_sha256(self.weights_path)

    def load_network(self, path: Path, sha256: str | None):
        """The model's network read from ``path`` (hash ``sha256`` checked): each learned model implements it."""
        raise NotImplementedError(f"{type(self).__name__} uses LazyWeights and must define load_network(path, sha256)")

    def network(self):
        """The network on this process's device, loaded once per process (weights hash- and convention-checked)."""
        path, sha = self.weights_path, self.expected_sha256()
        device = pick_device(self.params.device, self.name)
        return cached_network((self.name, str(path), sha, str(device)),
                              lambda: self.load_network(path, sha).to(device).eval())
