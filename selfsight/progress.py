"""Progress of the long waits (feature extraction, baselines, indexing, caching, embedding).

On a terminal: a tqdm bar on stderr. Elsewhere (a log file, CI, a pipe): one log line every
``PERIOD`` seconds with the count, the rate and the time left, and a closing line for a wait that
took longer than ``PERIOD``, so non-interactive output stays short. ``SELFSIGHT_PROGRESS=0`` turns
both off (and ``enabled=False`` for one wait).
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

PERIOD = 10.0          # seconds between progress lines when stderr is not a terminal
log = logging.getLogger("selfsight")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


class Progress:
    """``with Progress(total, "features of the test data") as p: ... p.update(n)``."""

    def __init__(self, total: int | None, desc: str, unit: str = "images", enabled: bool = True,
                 initial: int = 0, period: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.period = PERIOD if period is None else period
        self.n = self.start_n = initial
        self.enabled = enabled and os.environ.get("SELFSIGHT_PROGRESS", "1") != "0"
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit[:3], dynamic_ncols=True, leave=False)
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.period:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: 1234/10000 images (12 %), 250 images/s, ~0:35 left``."""
        span = max((now or time.perf_counter()) - self.t0, 1e-9)
        rate = (self.n - self.start_n) / span
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {rate:.0f} {self.unit}/s"
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %), "
                f"{rate:.0f} {self.unit}/s, ~{eta} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and time.perf_counter() - self.t0 >= self.period:
            log.info("%s: %d %s in %s", self.desc, self.n - self.start_n, self.unit, _clock(time.perf_counter() - self.t0))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
