"""The ``--features`` choice of the evaluations, parsed without torch (so that ``selfsight --help``
and argument checks stay fast): ``cls``, ``mean``, ``cls+mean``, ``lastN``, ``lastN+mean``."""
from __future__ import annotations

import re

FEATURES = ("cls", "mean", "cls+mean")
_LAST = re.compile(r"last(\d+)(\+mean)?")
FEATURES_HELP = ("cls (a ViT's class token, a ConvNet's pooled map), mean (mean of the patch tokens), cls+mean, "
                 "lastN (ViTs: class tokens of the last N blocks, e.g. last4, as DINO's linear probe) or "
                 "lastN+mean (plus the mean patch token of the last block)")


def parse_features(features: str) -> tuple[str, int, bool]:
    """``cls`` | ``mean`` | ``cls+mean`` | ``lastN`` | ``lastN+mean`` -> (kind, n, with_mean);
    kind is the name itself, or ``last`` for the last-N-blocks choices."""
    if features in FEATURES:
        return features, 1, False
    m = _LAST.fullmatch(features)
    if m and int(m.group(1)) >= 1:
        return "last", int(m.group(1)), m.group(2) is not None
    raise ValueError(f"features must be one of {', '.join(FEATURES)}, lastN or lastN+mean (N >= 1, e.g. last4), "
                     f"got {features!r}")
