"""Checkpoints written atomically and read safely.

Write: temporary file in the same folder, flush + fsync, ``os.replace``, fsync of the folder,
so a crash at any moment leaves either the old or the new file, never a torn one.
Read: ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path: str | Path, map_location="cpu") -> dict:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"refusing to load {path}: not a plain-tensor selfsight checkpoint "
                              f"(weights_only load failed: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "format_version" not in obj:
        raise CheckpointError(f"{path} is not a selfsight checkpoint")
    if obj["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {obj['format_version']}; this selfsight reads "
                              f"up to {FORMAT_VERSION}: upgrade selfsight")
    return obj


def rng_state() -> dict:
    """Every random state that shapes the next steps, as tensors/ints (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
