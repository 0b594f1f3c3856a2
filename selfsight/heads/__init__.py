from selfsight.heads.mlp import ProjectionMLP

__all__ = ["ProjectionMLP"]
