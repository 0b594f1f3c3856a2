"""The random state a resumed run needs to continue exactly (the checkpoint's ``rng``); reading and
writing the file itself is ``files`` (atomic, ``weights_only``), its layout ``runs``."""
from __future__ import annotations

import random

import numpy as np
import torch


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
