"""Files written whole or not at all, and torch files read safely.

Write: ``atomic_write`` writes to a temporary file in the same folder, flushes and fsyncs it,
renames it over the target and fsyncs the folder, so a crash at any moment leaves either the old
file or the new one, never a torn one; a leftover temporary file of a killed writer is removed by
the next ``atomic_save``. The file then gets the mode ``open()`` would give a new file (0666 less
the umask: 0644 under the usual umask 022), not the 0600 of the temporary file, so checkpoints,
exports and embeddings follow one rule with everything else selfsight writes.

Read: ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs; a file
carrying a code payload is refused in one line, random or truncated bytes are named as such, a
selfsight file of a newer format says to upgrade (``safe_load``), and a state dict of other keys
or shapes is named key by key (``load_model_state``).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from selfsight.faults import checkpoint_write_delay

FORMAT_VERSION = 1          # of selfsight's own torch files (run checkpoints, tokenizer artifacts)


class CheckpointError(RuntimeError):
    """A file selfsight cannot or will not load; the message says which and why, in one line."""


def new_file_mode() -> int:
    """0666 less this process's umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file and move it to ``path`` atomically (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:                 # a folder that cannot be opened for reading: the rename is done
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (``files.atomic_write``); the temporary files of
    a writer killed before its rename are removed afterwards."""
    path = Path(path)

    def write(f) -> None:
        torch.save(obj, f)
        f.flush()
        checkpoint_write_delay()                # test hook (SELFSIGHT_TEST_CHECKPOINT_DELAY), inert otherwise
    atomic_write(path, write)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):      # left by a writer killed before os.replace
        try:
            stale.unlink()
        except OSError:
            pass


def load_plain(path: str | Path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with one-line CheckpointErrors: a file holding anything
    but tensors and plain containers (e.g. a pickled object whose ``__reduce__`` runs code) is
    refused before any of it runs; a missing, truncated or corrupt file is named as such."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        if not lines[0].startswith("Weights only load failed"):          # a torn pickle, not a refused one
            raise CheckpointError(f"cannot read {path}: truncated or corrupt ({lines[0]})") from None
        code = next((x for x in lines if "GLOBAL" in x), None)
        if code is None:            # e.g. "Unsupported operand 244": bytes that are no torch pickle at all
            raise CheckpointError(f"cannot read {path}: not a torch checkpoint (corrupt, or a file of another "
                                  "kind)") from None
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain "
                              f"containers, and loading them could run code ({code})") from None
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {path}: not a readable torch file (truncated or corrupt? {first})") \
            from None


def safe_load(path: str | Path, map_location="cpu") -> dict:
    """A selfsight checkpoint (any dict with ``format_version``) read by ``load_plain``."""
    obj = load_plain(path, map_location)
    if not isinstance(obj, dict) or "format_version" not in obj:
        raise CheckpointError(f"{path} is not a selfsight checkpoint")
    version = obj["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this selfsight reads "
                              f"up to {FORMAT_VERSION}: upgrade selfsight")
    return obj


def load_model_state(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``module.load_state_dict(state)``, or a one-line CheckpointError naming the keys that
    are missing, unexpected or of another shape (instead of torch's multi-line report)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{what} {len(keys)} (e.g. {', '.join(keys[:3])})" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if parts:
        raise CheckpointError(f"{path} does not fit this {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(state)
