from selfsight.losses.cosine import byol_regression, negative_cosine
from selfsight.losses.dino import dino_loss, teacher_probs, update_center
from selfsight.losses.info_nce import info_nce_queue, moco_v3_loss
from selfsight.losses.nt_xent import nt_xent
from selfsight.losses.redundancy import barlow_twins_loss, vicreg_loss

__all__ = ["barlow_twins_loss", "byol_regression", "dino_loss", "info_nce_queue", "moco_v3_loss", "negative_cosine",
           "nt_xent", "teacher_probs",
           "update_center", "vicreg_loss"]
