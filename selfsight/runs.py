"""Run folders: what a run leaves (``RUN/checkpoint.pt``, ``config.yaml``, ``metrics.jsonl``, ``tb/``,
``eval/``, ``pictures/``) and how a run is rebuilt from it (``load_run``: the config saved in the
checkpoint resolved again, the method built from it, the trained weights loaded).

The checkpoint is one dict of tensors and plain containers (``model``, ``optimizer``, ``step``,
``total_steps``, ``elapsed``, ``rng``, ``loader``, ``config``, ``meta`` with the preprocessing; under
DDP also ``rank_states``), read with ``torch.load(weights_only=True)`` (``files.safe_load``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfsight.files import CheckpointError, load_model_state, safe_load
from selfsight.methods import build_method
from selfsight.resolve import build_config

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(run: str | Path) -> Path:
    """``RUN/checkpoint.pt`` of a run folder, or the file itself."""
    p = Path(run)
    return p / CHECKPOINT if p.is_dir() else p


def preprocess_meta(recipe, channels: int) -> dict:
    """What evaluation and export feed the backbone: the view size, normalization and channels."""
    return {"size": recipe.size, "mean": list(recipe.mean), "std": list(recipe.std), "channels": channels}


def check_compatible(ck: dict, method: str, backbone: str, path: str | Path) -> None:
    """Refuse (one line) a checkpoint written by another method or backbone than ``method``/``backbone``."""
    meta = ck.get("meta") or {}
    theirs = (meta.get("method"), meta.get("backbone"))
    if theirs != (method, backbone):
        raise CheckpointError(f"{path} holds a {theirs[0]}/{theirs[1]} run (method/backbone), not "
                              f"{method}/{backbone}: resume it with its own config or choose another --out")


def load_run(path: str | Path, device="cpu", random_init: bool = False):
    """A run folder or checkpoint -> (method module in eval mode, config, preprocess meta).

    ``random_init=True`` builds the same network without loading the trained weights (the
    random-initialisation baseline; seeded by the run's seed).
    """
    ck_path = checkpoint_path(path)
    if not ck_path.exists():
        raise CheckpointError(f"no checkpoint at {ck_path}")
    ck = safe_load(ck_path, map_location="cpu")
    cfg = build_config(ck["config"], resolved=True)
    pre = ck["meta"]["preprocess"]
    torch.manual_seed(cfg.train.seed)
    model = build_method(cfg, pre["channels"], pre["size"])
    if not random_init:
        load_model_state(model, ck["model"], ck_path)
    return model.to(device).eval(), cfg, pre
