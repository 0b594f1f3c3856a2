"""Progress of the long waits (training, feature extraction, baselines, indexing, caching, embedding).

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
TRAINING_PERIOD = 30.0  # the same for the training loop (its log rows go to metrics.jsonl anyway)
log = logging.getLogger("selfsight")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


class Progress:
    """``with Progress(total, "features of the test data") as p: ... p.update(n)``."""

    def __init__(self, total: int | None, desc: str, unit: str = "images", enabled: bool = True,
                 initial: int = 0, period: float | None = None, leave: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.period = PERIOD if period is None else period
        self.n = self.start_n = initial
        self.enabled = enabled and os.environ.get("SELFSIGHT_PROGRESS", "1") != "0"
        self.bar = None
        self.postfix: dict = {}
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit[:3], dynamic_ncols=True, leave=leave)
        self.t0 = self.last = time.perf_counter()

    def set_total(self, total: int | None) -> None:
        """A total known only later (a minutes budget estimated after the first steps)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def set_postfix(self, **values) -> None:
        """Values shown after the count (the bar's postfix; the end of each line elsewhere)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

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
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        speed = f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s"
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {speed}{extra}"
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %), "
                f"{speed}, ~{eta} left{extra}")

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
