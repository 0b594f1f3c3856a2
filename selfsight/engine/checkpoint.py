"""Checkpoints written atomically and read safely.

Write: temporary file in the same folder, flush + fsync, ``os.replace``, fsync of the folder,
so a crash at any moment leaves either the old or the new file, never a torn one.
A leftover temporary file of a killed writer is removed by the next successful write.
Read: ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs; a
checkpoint of another method or backbone, or with other model keys, is refused with one line
naming what differs (``check_compatible``, ``load_model_state``).
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from selfsight.faults import checkpoint_write_delay
from selfsight.files import atomic_write

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


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


def check_compatible(ck: dict, method: str, backbone: str, path: str | Path) -> None:
    """Refuse (one line) a checkpoint written by another method or backbone than ``method``/``backbone``."""
    meta = ck.get("meta") or {}
    theirs = (meta.get("method"), meta.get("backbone"))
    if theirs != (method, backbone):
        raise CheckpointError(f"{path} holds a {theirs[0]}/{theirs[1]} run (method/backbone), not "
                              f"{method}/{backbone}: resume it with its own config or choose another --out")


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
    torch.set_rng_state(state["torch"].cpu())          # a checkpoint read with map_location=cuda
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
