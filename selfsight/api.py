"""The stable public Python API (``import selfsight``; docs/api.md).

``pretrain`` -> a run folder; ``evaluate`` -> kNN / linear-probe accuracy of a run; ``export`` ->
the backbone alone in a file; ``load_backbone`` -> (module, preprocess); ``embed`` -> embeddings
of a folder; ``neighbors`` -> the most similar images. Names here keep their meaning across
releases; everything else in the package is internal and may move.
"""
from __future__ import annotations

from pathlib import Path

from selfsight.deploy import embed, export, load_backbone, neighbors

__all__ = ["pretrain", "evaluate", "export", "load_backbone", "embed", "neighbors", "load_config"]


def load_config(config=None, overrides=None):
    """A run config: ``config`` is None (defaults), a YAML file or a bundled recipe name
    (``"simclr_fashion_mnist"``); ``overrides``: ``["key=value", ...]`` or ``{"dotted.key": value}``."""
    from selfsight.resolve import load_config as _load  # lazy: keeps import selfsight free of torch
    return _load([str(config)] if config is not None else [], _tree(overrides))


def pretrain(config=None, out: str | Path = "runs/run", *, overrides=None, resume: bool = False, dataset=None,
             backbone=None) -> dict:
    """Pretrain and write ``out/{checkpoint.pt, config.yaml, metrics.jsonl}``; returns the run summary.

    ``config``: a ``RunConfig`` (``load_config``), a YAML file, a bundled recipe name or None;
    ``overrides`` apply on top (a budget such as ``train.minutes=5`` is required somewhere).
    ``dataset``: any data source instead of ``data.train``; ``backbone``: any ``nn.Module``.
    """
    from selfsight.config import RunConfig, merge, to_dict  # lazy: keeps import selfsight free of torch
    from selfsight.engine.trainer import pretrain as _pretrain
    from selfsight.resolve import build_config
    if isinstance(config, RunConfig):
        if overrides:
            config = build_config(merge(to_dict(config), _tree(overrides)))
    else:
        config = load_config(config, overrides)
    return _pretrain(config, out, resume=resume, dataset=dataset, backbone=backbone)


def _tree(overrides) -> dict:
    """``["a.b=1"]`` or ``{"a.b": 1}`` -> the nested dict the config merges."""
    from selfsight.config import parse_overrides, set_dotted  # lazy: keeps import selfsight free of torch
    if not overrides:
        return {}
    if not isinstance(overrides, dict):
        return parse_overrides(list(overrides))
    tree: dict = {}
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return tree


def evaluate(run: str | Path, train: str = "fashion-mnist", test: str = "fashion-mnist:test",
             protocol: str = "knn", backbone=None, **options) -> dict:
    """Accuracy of a run's backbone: ``protocol="knn"`` (weighted kNN, DINO's protocol; options k,
    temperature, ...), ``"linear"`` (linear probe on frozen features; options epochs, ...) or
    ``"finetune"`` (the whole backbone trained on ``train``; options epochs, lr, layer_decay, ...),
    ``"seg"`` (linear segmentation of frozen patch tokens: mIoU on data with masks, e.g.
    ``fashion-mnist-scenes``; options size, blocks, epochs, max_train_images);
    ``baseline="pixels"|"random"`` evaluates a baseline instead (``seg``: random only). ``"health"``
    gives the label-free metrics of the backbone on ``train`` (RankMe, alignment, uniformity; ``test`` is unused).
    Returns top1/top5 (or the metrics) and details. ``backbone``: a new instance of the module a
    run trained from Python (``pretrain(..., backbone=module)``), for its weights to be loaded into."""
    from selfsight.runs import custom_backbone  # lazy: keeps import selfsight free of torch
    with custom_backbone(backbone):
        return _evaluate(run, train, test, protocol, options)


def _evaluate(run, train: str, test: str, protocol: str, options: dict) -> dict:
    from selfsight.eval.knn import evaluate_knn  # lazy: keeps import selfsight free of torch
    from selfsight.eval.linear import evaluate_linear
    if protocol == "knn":
        return evaluate_knn(str(run), train, test, **options)
    if protocol == "linear":
        return evaluate_linear(str(run), train, test, **options)
    if protocol == "finetune":
        from selfsight.eval.finetune import finetune
        return finetune(str(run), train, test, **options)
    if protocol == "seg":
        from selfsight.eval.dense import evaluate_segmentation
        return evaluate_segmentation(str(run), train, test, **options)
    if protocol == "health":
        from selfsight.eval.health import evaluate_health
        return evaluate_health(str(run), train, **options)
    raise ValueError(f"protocol must be knn, linear, finetune, seg or health, got {protocol!r}")
