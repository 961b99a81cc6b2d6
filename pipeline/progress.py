"""Progress bars for long dask work (tqdm, driven by dask's local-scheduler callbacks)."""

from __future__ import annotations

import contextlib
import sys

from dask.callbacks import Callback


class TqdmCallback(Callback):
    """A tqdm bar over the tasks of a local-scheduler ``compute``."""

    def __init__(self, desc: str = "") -> None:
        super().__init__()
        self.desc = desc
        self.bar = None

    def _start_state(self, dsk, state):
        from tqdm.auto import tqdm

        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self.bar = tqdm(total=total, desc=self.desc, unit="task", file=sys.stderr, leave=False, disable=None)

    def _posttask(self, key, result, dsk, state, worker_id):
        if self.bar is not None:
            self.bar.update(1)

    def _finish(self, dsk, state, errored):
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def progress_bar(enabled: bool = True, desc: str = ""):
    if not enabled:
        yield
        return
    with TqdmCallback(desc):
        yield
