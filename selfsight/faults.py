"""Test-only fault injection hooks for the fault suite (tests/faults/, docs/guarantees.md).

Every hook is inert unless its ``SELFSIGHT_TEST_*`` environment variable is set; nothing in
normal use sets them.

- ``SELFSIGHT_TEST_CHECKPOINT_DELAY=SECONDS``: ``atomic_save`` sleeps this long after the
  temporary file is written and fsynced and before ``os.replace``, so that a test can kill the
  process in the middle of a checkpoint write.
- ``SELFSIGHT_TEST_CRASH=RANK:STEP:MARKER``: the process of rank RANK dies (``os._exit(1)``, no
  cleanup, as a lost node) when it fetches the batch of global step STEP, once: the marker file
  MARKER is created first, and no process crashes while it exists (so a restarted job survives).
"""
from __future__ import annotations

import os
import time


def checkpoint_write_delay() -> None:
    delay = os.environ.get("SELFSIGHT_TEST_CHECKPOINT_DELAY")
    if delay:
        time.sleep(float(delay))


def maybe_crash(step: int, rank: int) -> None:
    spec = os.environ.get("SELFSIGHT_TEST_CRASH")
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"rank {rank} crashed at step {step}\n")
        os._exit(1)
