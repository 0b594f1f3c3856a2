"""selfsight: image-only self-supervised pretraining, evaluation and export."""
__version__ = "0.1.0"
