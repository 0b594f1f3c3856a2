"""Run folders: what a run leaves (``RUN/checkpoint.pt``, ``config.yaml``, ``metrics.jsonl``, ``tb/``,
``eval/``, ``pictures/``) and how a run is rebuilt from it (``load_run``: the config saved in the
checkpoint resolved again, the method built from it, the trained weights loaded).

The checkpoint is one dict of tensors and plain containers (``model``, ``optimizer``, ``step``,
``total_steps``, ``elapsed``, ``rng``, ``loader``, ``config``, ``meta`` with the preprocessing; under
DDP also ``rank_states``), read with ``torch.load(weights_only=True)`` (``files.safe_load``).
"""
from __future__ import annotations

import contextvars
import copy
from contextlib import contextmanager
from pathlib import Path

import torch

from selfsight.backbones.weights import read_state, sha256
from selfsight.files import CheckpointError, load_model_state, load_plain, safe_load
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


_CUSTOM: contextvars.ContextVar = contextvars.ContextVar("custom_backbone", default=None)


@contextmanager
def custom_backbone(module):
    """Inside the block, every ``load_run`` of a run that trained a module given from Python
    (``backbone.name=custom:...``) loads its weights into a copy of ``module`` (a new instance of the
    same class): evaluation, pictures and embeddings of such runs from the API."""
    token = _CUSTOM.set(module)
    try:
        yield
    finally:
        _CUSTOM.reset(token)


def load_run(path: str | Path, device="cpu", random_init: bool = False, backbone=None):
    """A run folder or checkpoint -> (method module in eval mode, config, preprocess meta).

    ``random_init=True`` builds the same network without loading the trained weights (the
    random-initialisation baseline; seeded by the run's seed). ``backbone``: a new instance of
    the module a run trained from Python (``backbone.name=custom:...``); its trained weights are
    loaded into it.
    """
    ck_path = checkpoint_path(path)
    if not ck_path.exists():
        raise CheckpointError(f"no checkpoint at {ck_path}")
    ck = safe_load(ck_path, map_location="cpu")
    cfg = build_config(ck["config"], resolved=True)
    pre = ck["meta"]["preprocess"]
    if backbone is None and cfg.backbone.name.startswith("custom:") and _CUSTOM.get() is not None:
        backbone = copy.deepcopy(_CUSTOM.get())
    torch.manual_seed(cfg.train.seed)
    model = build_method(cfg, pre["channels"], pre["size"], backbone)
    if not random_init:
        load_model_state(model, ck["model"], ck_path)
    return model.to(device).eval(), cfg, pre


def starting_state(path: str | Path) -> tuple[dict, dict]:
    """The state dict that ``backbone.weights`` names, and where it came from: a selfsight run
    folder or checkpoint (its evaluation backbone: DINO's teacher, MoCo's query encoder, ...), a
    selfsight export, a hub folder (its ``model.safetensors``) or any ``.safetensors``/``.pth``
    state dict; the source's sha256 is recorded."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"backbone.weights: {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"                 # a timm / Hugging Face hub folder (export --format hf)
    file = checkpoint_path(p)
    if p.is_dir() or (file.suffix in (".pt", ".pth") and _is_checkpoint(file)):
        model, cfg, _ = load_run(file)
        state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        kind = f"selfsight run ({cfg.method.name}/{cfg.backbone.name})"
    else:
        state, kind = read_state(file), "state dict"
    return state, {"source": str(p.resolve()), "kind": kind, "sha256": sha256(file)}


def _is_checkpoint(path: Path) -> bool:
    try:
        obj = load_plain(path)
    except CheckpointError:
        return False
    return isinstance(obj, dict) and "format_version" in obj and "model" in obj and "config" in obj
