"""Progress: a batch-level counter with ETA, and a per-target task bar.

* :class:`BatchProgress`: targets (or tiles) finished out of the batch, with elapsed time and ETA. On a terminal
  a tqdm bar; otherwise (cron, CI, a log file) an INFO line per finished unit, so logs show where a long batch is.
* :func:`progress_bar`: tqdm's own dask callback (``tqdm.dask.TqdmCallback``) over the tasks of one target's
  compute, on a terminal only (local schedulers; dask.distributed has its dashboard).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

log = logging.getLogger("cloudfree.progress")


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class BatchProgress:
    """Units finished out of ``total``: a tqdm bar with ETA on a TTY, INFO lines otherwise. Thread-safe
    (units may finish concurrently, ``run.concurrent_targets``)."""

    def __init__(self, total: int, desc: str = "targets", *, enabled: bool = True, stream=None,
                 tty: bool | None = None) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.done = 0
        self.counts: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self.bar = None
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=desc.rstrip("s") or "unit", file=self.stream,
                            dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far (None before the first unit)."""
        if not self.done:
            return None
        return (time.perf_counter() - self.t0) / self.done * (self.total - self.done)

    def line(self, name: str = "", status: str = "") -> str:
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        last = f" last: {name} {status}" if name else ""
        return (f"{self.desc} {self.done}/{self.total} ({parts}), elapsed {_hms(elapsed)}, "
                f"ETA {_hms(eta) if eta is not None else '?'}{last}")

    def update(self, name: str = "", status: str = "done") -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += 1
            self.counts[status] = self.counts.get(status, 0) + 1
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())))
                self.bar.update(1)
            else:
                log.info("progress: %s", self.line(name, status))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "BatchProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def progress_bar(enabled: bool = True, desc: str = ""):
    """tqdm's dask callback over one compute (a terminal only: tqdm disables itself elsewhere)."""
    if not enabled:
        yield
        return
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc=desc, unit="task", file=sys.stderr, leave=False, disable=None):
        yield
