from selfsight.losses.cosine import byol_regression, negative_cosine
from selfsight.losses.info_nce import info_nce_queue, moco_v3_loss
from selfsight.losses.nt_xent import nt_xent

__all__ = ["byol_regression", "info_nce_queue", "moco_v3_loss", "negative_cosine", "nt_xent"]
