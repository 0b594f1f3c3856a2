"""Regression losses of the non-contrastive methods (no negatives).

* ``negative_cosine`` (SimSiam, Chen & He 2021, Eq. 1-2; ``simsiam:main_simsiam.py``):
  D(p, z) = -cos(p, sg(z)), averaged over the batch; minimum -1.
* ``byol_regression`` (BYOL, Grill et al. 2020, Eq. 2; ``byol:helpers.regression_loss``):
  ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, sg(z)), averaged over the batch; minimum 0.

The target z is detached here (stop-gradient, pitfall 7) whatever the caller passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import upcast


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p: N×d predictions (with grad), z: N×d targets (stop-gradient). Returns a scalar."""
    return -F.cosine_similarity(upcast(p), upcast(z.detach()), dim=1).mean()


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p: N×d online predictions, z: N×d target projections. Returns a scalar."""
    return (2 - 2 * F.cosine_similarity(upcast(p), upcast(z.detach()), dim=1)).mean()
