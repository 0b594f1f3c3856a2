"""View recipes: one image -> a list of augmented views."""
from selfsight.augment.views import ViewRecipe, build_per_sample_views, resolve_recipe
from selfsight.augment.batched import BatchedViews

__all__ = ["ViewRecipe", "build_per_sample_views", "resolve_recipe", "BatchedViews"]
