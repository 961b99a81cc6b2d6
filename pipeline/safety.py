"""Containment of untrusted strings and concurrent runs: safe path stems, containment checks, per-target locks and
staging folders.

Item ids (and every other catalog-supplied string) are untrusted input: a remote catalog can serve ``..``,
``../../etc``, absolute paths, separators, NUL bytes or 10 kB ids. :func:`safe_stem` maps any id to a file-name
stem that cannot leave its folder; :func:`ensure_inside` is checked before every write, rename and ``rmtree`` under
``output.dir``.

Concurrency: :func:`target_lock` is an ``fcntl.flock`` on ``<output.dir>/.locks/<stem>.lock`` held while a target is
checked, computed and published, so two runs on one output folder never write the same target at once (the second
waits, then finds it done). Staging folders are ``<output.dir>/.staging/<stem>+<run id>/``, one per run and target;
all temporary files (the intermediate GeoTIFF, rio-cogeo's temporaries) live there, and a folder left by a killed
run is removed by the next run that takes the target's lock (whether it redoes or skips the target).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from cloudfree.pipeline.errors import CloudfreeError, ConfigError, OutputError

log = logging.getLogger(__name__)

#: longest stem kept verbatim (file names are limited to 255 bytes; ``<stem>_mask_provenance.tif`` is appended).
MAX_STEM = 120
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
STAGING = ".staging"
LOCKS = ".locks"
#: where ``--overwrite`` moves the previous output while the new one is renamed into place: never matched by the
#: stale-staging cleanup; a run that finds ``<stem>`` missing and an aside copy here restores it.
REPLACED = ".replaced"
#: between a stem and a run id in staging names; never part of a stem (safe_stem keeps [A-Za-z0-9._-]).
SEP = "+"


class UnsafePathError(CloudfreeError, ValueError):
    """A path built from untrusted input would leave the output folder."""


def safe_stem(raw: str, max_len: int = MAX_STEM) -> str:
    """A file-name stem for ``raw`` (e.g. a STAC item id) that stays inside its folder.

    Ids made of ``[A-Za-z0-9._-]`` (not starting with ``.``, at most ``max_len`` long) are kept as they are, so
    ordinary Sentinel-2 ids map to themselves. Anything else (separators, ``..``, NUL, spaces, non-ASCII, a
    leading dot, too long) is sanitised (runs of other characters become ``_``, leading dots/underscores dropped,
    length capped) and suffixed with ``-`` and 10 hex digits of the raw id's sha256, so two different hostile ids
    never share a stem.
    """
    raw = str(raw)
    if raw and len(raw) <= max_len and not _SAFE.search(raw) and not raw.startswith(".") and raw not in (".", ".."):
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    clean = _SAFE.sub("_", raw).lstrip("._-")[: max_len - 11] or "item"
    return f"{clean}-{digest}"


def ensure_inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, after checking it lies strictly inside ``root`` (resolved); raises
    :class:`UnsafePathError` otherwise. Call before every write, rename and delete under ``output.dir``.

    Relative paths are relative to the working directory, like ``root`` itself: callers build paths as
    ``Path(root) / ...``, so a relative ``output.dir`` (``outputs/demo``, the demo config's) must not be
    prefixed a second time."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    if p == r or r not in p.parents:
        raise UnsafePathError(f"refusing to touch {p}: it is outside the output folder {r} (built from an untrusted "
                              "id?); report the catalog item")
    return p


def safe_rmtree(root: str | Path, path: str | Path) -> None:
    """``shutil.rmtree(path)`` only when ``path`` is inside ``root`` and not a symlink."""
    p = ensure_inside(root, path)
    if p.is_symlink():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


@contextlib.contextmanager
def target_lock(out_dir: str | Path, stem: str, *, poll: float = 0.5) -> Iterator[Path]:
    """Exclusive lock on one output target (``<out_dir>/.locks/<stem>.lock``), held for the ``with`` block.

    Blocks while another run (process) holds it and logs once that it waits. The lock is released by the kernel
    when the holder dies (SIGKILL included), so no stale lock can block a rerun.
    """
    lock_path = ensure_inside(out_dir, Path(out_dir) / LOCKS / f"{stem}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another run is writing this target; waiting for its lock %s", stem, lock_path)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def staging_dir(out_dir: str | Path, stem: str, run_id: str) -> Path:
    """A fresh staging folder for one target of one run (``<out_dir>/.staging/<stem>+<run_id>``)."""
    d = ensure_inside(out_dir, Path(out_dir) / STAGING / f"{stem}{SEP}{safe_stem(run_id)}")
    if d.exists():
        safe_rmtree(out_dir, d)
    d.mkdir(parents=True)
    return d


def clean_stale_staging(out_dir: str | Path, stem: str) -> list[Path]:
    """Remove staging folders of ``stem`` left by killed runs. Call with the target's lock held (then no live run
    can own them). Also removes the pre-lock layout ``<out_dir>/.staging-<stem>``. First, an ``--overwrite`` that
    died between its two renames is settled (:func:`recover_replaced`): the previous output is never lost."""
    out = Path(out_dir)
    recover_replaced(out, stem)
    stale = list((out / STAGING).glob(f"{glob_escape(stem)}{SEP}*")) if (out / STAGING).is_dir() else []
    legacy = out / f".staging-{stem}"
    if legacy.exists():
        stale.append(legacy)
    for d in stale:
        log.info("%s: removing staging folder %s left by an interrupted run", stem, d)
        safe_rmtree(out, d)
    return stale


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def recover_replaced(out_dir: str | Path, name: str) -> Path | None:
    """Settle an interrupted ``--overwrite`` of the output folder ``name`` (call with its lock held): when
    ``<out>/<name>`` is missing (the run died after moving the old output aside, before the new one arrived) the
    newest aside copy ``<out>/.replaced/<name>+<pid>`` is renamed back; the other aside copies (the new output did
    arrive) are removed. Returns the restored folder, if any."""
    out = Path(out_dir)
    aside_dir = out / REPLACED
    if not aside_dir.is_dir():
        return None
    asides = sorted(aside_dir.glob(f"{glob_escape(name)}{SEP}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    final = ensure_inside(out, out / name)
    restored = None
    if asides and not final.exists():
        log.warning("%s: restoring the previous output from %s (an --overwrite was interrupted before the new "
                    "output arrived)", name, asides[0])
        asides[0].rename(final)
        restored, asides = final, asides[1:]
    for d in asides:
        log.info("%s: removing %s (an --overwrite finished, its cleanup was interrupted)", name, d)
        safe_rmtree(out, d)
    return restored


def publish_dir(out_dir: str | Path, stage: Path, final: Path) -> Path:
    """Move a finished staging folder into place as ``final`` (a folder): a rename of the whole folder, so a reader
    sees either the old complete output or the new complete one. An existing ``final`` (``--overwrite``) is renamed
    aside first, into ``<out>/.replaced/`` (never touched by the stale-staging cleanup), and removed after; a crash
    between the two renames is undone by the next run (:func:`recover_replaced`)."""
    out = Path(out_dir)
    ensure_inside(out, stage)
    final = ensure_inside(out, final)
    old = None
    if final.exists():
        old = ensure_inside(out, out / REPLACED / f"{final.name}{SEP}{os.getpid()}")
        old.parent.mkdir(parents=True, exist_ok=True)
        if old.exists():
            safe_rmtree(out, old)
        final.rename(old)
    stage.rename(final)
    if old is not None:
        safe_rmtree(out, old)
    return final


#: errno values that are the output side's fault, whatever file is named: disk full, quota, file-size limit,
#: read-only file system.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_DIR = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _under(root: Path, name) -> bool:
    if not name:
        return False
    try:
        p, r = Path(os.fsdecode(name)).absolute(), Path(root).absolute()
    except (TypeError, ValueError):
        return False
    return p == r or r in p.parents or p in r.parents


def output_fault(exc: BaseException, out_dir: str | Path) -> str | None:
    """A message naming the OUTPUT and the fix when ``exc`` (or an exception it was raised from) is an output-side
    fault under ``out_dir``: disk full / quota / file-size limit (any file: the inputs are only read), a read-only
    or permission-denied output folder, or a file where the output folder (or one of its parents) should be. None
    when it is not one (then it is blamed on the inputs)."""
    out = Path(out_dir)
    x, seen = exc, 0
    while x is not None and seen < 8:
        seen += 1
        if isinstance(x, OutputError):
            return str(x)
        if isinstance(x, OSError) and x.errno is not None:
            name = x.filename or getattr(x, "filename2", None)
            where = os.fsdecode(name) if name else str(out)
            if x.errno in _FULL:
                return (f"output {where}: no space left ({os.strerror(x.errno)}: the disk or quota of output.dir "
                        f"{out} is full, or a file-size limit was hit); free space there or set output.dir (--out) "
                        "to a folder with room, then rerun (finished targets are kept, the partial one was removed)")
            if x.errno in _DENIED and (x.errno == errno.EROFS or _under(out, name)):
                return (f"output {where}: cannot write ({os.strerror(x.errno)}): output.dir {out} is read-only or "
                        "not writable by this user; make it writable or set output.dir (--out) to a writable folder")
            if x.errno in _NOT_DIR and _under(out, name):
                return (f"output {where}: {os.strerror(x.errno)}: output.dir {out} (or a part of its path) is a file "
                        "where a folder is needed; move the file away or set output.dir (--out) to a folder")
        msg = str(x)
        if ("No space left on device" in msg or "Disk quota exceeded" in msg or "File too large" in msg):
            return (f"output.dir {out}: no space left while writing ({msg.strip()[:200]}); free space there or set "
                    "output.dir (--out) to a folder with room, then rerun")
        x = x.__cause__ or x.__context__
    return None


def prepare_output_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if missing; a :class:`ConfigError` (exit 2, before any target runs) naming it and the fix when it (or a parent) is a file
    or cannot be created. An existing read-only folder passes: its finished targets are skipped, the others fail
    with an output error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir {out} is a file, not a folder; move the file away or set output.dir (--out) "
                          "to a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(output_fault(exc, out) or f"output.dir {out} cannot be created ({exc}); set output.dir "
                          "(--out) to a writable folder") from exc
    return out
