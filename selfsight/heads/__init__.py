from selfsight.heads.dino import DINOHead
from selfsight.heads.mlp import ProjectionMLP

__all__ = ["DINOHead", "ProjectionMLP"]
