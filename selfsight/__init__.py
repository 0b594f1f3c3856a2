"""selfsight: image-only self-supervised pretraining, evaluation and export."""
__version__ = "0.1.0"

# The public API (docs/api.md), imported on first use so that `import selfsight` stays fast.
_API = ("pretrain", "evaluate", "export", "load_backbone", "embed", "neighbors", "load_config")


def __getattr__(name: str):
    if name in _API:
        from selfsight import api  # lazy: keeps import selfsight free of torch
        return getattr(api, name)
    raise AttributeError(f"module 'selfsight' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
