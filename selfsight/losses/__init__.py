from selfsight.losses.cosine import byol_regression, negative_cosine
from selfsight.losses.info_nce import info_nce_queue, moco_v3_loss
from selfsight.losses.nt_xent import nt_xent
from selfsight.losses.redundancy import barlow_twins_loss, vicreg_loss

__all__ = ["barlow_twins_loss", "byol_regression", "info_nce_queue", "moco_v3_loss", "negative_cosine",
           "nt_xent", "vicreg_loss"]
