"""The tokenizer artifact, the file a trained tokenizer is handed on in (BEiT's visual tokens):
a plain-tensor checkpoint (loaded with ``weights_only=True``)::

    {"format_version": 1, "kind": str, "config": dict, "state_dict": dict,
     "preprocess": {"size": int, "mean": [...], "std": [...]}}

``kind`` names a builder registered in ``TOKENIZERS`` (``builder(config) -> nn.Module``). The
module's ``encode(x) -> B×h×w`` long ids takes images at ``preprocess`` size and normalization
and has ``vocab_size``. The package registers its kinds (dVAE, VQ) here when it is imported; a user
can register their own. Masked image modeling's token targets read artifacts through ``load_tokenizer``.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from selfsight.files import CheckpointError, atomic_save, load_model_state, safe_load
from selfsight.registry import Registry

TOKENIZERS: Registry = Registry("tokenizer")


def save_tokenizer(module: nn.Module, kind: str, config: dict, preprocess: dict, path: str | Path) -> None:
    atomic_save({"format_version": 1, "kind": kind, "config": config, "state_dict": module.state_dict(),
                 "preprocess": preprocess}, path)


def load_tokenizer(path: str | Path) -> tuple[nn.Module, dict]:
    """An artifact -> (tokenizer in eval mode, its preprocess dict)."""
    art = safe_load(path)
    if "kind" not in art or "state_dict" not in art:
        raise CheckpointError(f"{path} is a selfsight checkpoint but not a tokenizer artifact")
    try:
        build = TOKENIZERS.get(art["kind"])
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    try:
        module = build(art["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: tokenizer config does not build a {art['kind']} tokenizer ({e})") from None
    load_model_state(module, art["state_dict"], path)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval(), art["preprocess"]
