"""Progress reports over block pairs: a bar on the terminal and/or a user callback."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .._engine.schedule import ProgressFn


class _TextBar:
    """A one-line progress bar on a stream, for when tqdm is not installed."""

    def __init__(self, stream: TextIO, desc: str) -> None:
        self.stream, self.desc, self.t0, self.last = stream, desc, time.perf_counter(), -1.0

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        frac = done / total if total else 1.0
        filled = int(30 * frac)
        self.stream.write(f"\r{self.desc}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} block pairs"
                          f" {now - self.t0:.1f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, tqdm: Any, desc: str) -> None:
        self.bar = tqdm(total=None, desc=desc, unit="block pair", leave=True)

    def update(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Reporter:
    """Combines the optional bar and the optional callback into one (done, total) function."""

    def __init__(self, progress: bool, callback: ProgressFn | None, desc: str = "wsbound_fast") -> None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False; got {progress!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a callable (done, total) -> None or None; got {callback!r}")
        self.callback = callback
        self.bar: _TextBar | _TqdmBar | None = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = _TextBar(sys.stderr, desc)
            else:
                self.bar = _TqdmBar(tqdm, desc)

    @property
    def active(self) -> bool:
        return self.bar is not None or self.callback is not None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done, total)
        if self.callback is not None:
            self.callback(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
