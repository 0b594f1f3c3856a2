"""Which features of a backbone an evaluation reads (the ``--features`` choice, ``config.parse_features``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from selfsight.config import parse_features


def backbone_features(backbone: nn.Module, features: str = "cls"):
    """x -> B×D features: ``cls`` (the class token of a ViT, the pooled map of a ConvNet),
    ``mean`` (the mean of the patch tokens: MAE's global pool), ``cls+mean`` (concatenated),
    ``lastN`` (ViTs: the class tokens of the last N blocks, each after the final norm,
    concatenated: N·D; DINO ``eval_linear.py`` ``n_last_blocks``) or ``lastN+mean`` (plus the
    mean of the last block's patch tokens: DINO's ``avgpool_patchtokens``)."""
    kind, n_last, with_mean = parse_features(features)
    if kind == "last" and not hasattr(backbone, "get_intermediate_layers"):
        raise ValueError(f"--features {features} needs a ViT backbone (the class tokens of its last blocks); "
                         f"{type(backbone).__name__} has no blocks with class tokens: use cls, mean or cls+mean")
    if kind == "last" and getattr(getattr(backbone, "net", None), "cls_token", True) is None:
        raise ValueError(f"--features {features} takes the class tokens of the last blocks; "
                         f"{getattr(backbone, 'name', 'this ViT')} has no class token (it pools its patch tokens): "
                         "use cls, mean or cls+mean")

    def fn(x: torch.Tensor) -> torch.Tensor:
        if kind == "last":
            layers = backbone.get_intermediate_layers(x, n_last)                  # n × B×(1+N)×D, normed
            prefix = getattr(getattr(backbone, "net", None), "num_prefix_tokens", 1)
            out = [t[:, 0] for t in layers]
            if with_mean:
                out.append(layers[-1][:, prefix:].mean(1))
            return torch.cat(out, 1)
        f = backbone.forward_features(x)
        if kind == "cls":
            return f.cls
        mean = f.patch.mean(1) if f.patch is not None else f.cls
        return mean if kind == "mean" else torch.cat([f.cls, mean], 1)
    return fn
