"""Pixel targets and target normalizations against references written from MAE's code."""
import numpy as np
import pytest
import torch

from selfsight.targets import normalize_target, patchify, unpatchify


def test_patchify_order_is_maes_and_unpatchify_inverts_it(fmnist_small):
    x = torch.rand(2, 3, 12, 8)
    p = 4
    # MAE: x.reshape(N, C, h, p, w, p); einsum('nchpwq->nhwpqc'); reshape(N, h*w, p*p*C)
    ref = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 3, p, 2, p)).reshape(2, 6, p * p * 3)
    torch.testing.assert_close(patchify(x, p), ref)
    torch.testing.assert_close(unpatchify(patchify(x, p), p, (3, 2), 3), x)
    img = fmnist_small.images[:2].float()                                 # real images, 1 channel
    assert patchify(img, 4).shape == (2, 49, 16)
    torch.testing.assert_close(unpatchify(patchify(img, 4), 4, (7, 7), 1), img)
    with pytest.raises(ValueError, match="patches"):
        patchify(torch.rand(1, 3, 10, 10), 4)


def test_norm_pix_is_per_patch_with_unbiased_variance(fmnist_small):
    t = patchify(fmnist_small.images[:4].float() / 255, 4).double()
    out = normalize_target(t, "patch")
    ref = np.empty(t.shape)
    for b in range(t.shape[0]):
        for n in range(t.shape[1]):
            v = t[b, n].numpy()
            ref[b, n] = (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_layernorm_without_affine_and_l2():
    t = torch.randn(3, 5, 16) * 4 + 2
    ln = normalize_target(t, "layernorm")
    mu, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(ln, (t - mu) / (var + 1e-6).sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalize_target(t, "l2").norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(normalize_target(t, "none"), t)
    with pytest.raises(ValueError, match="method.target.norm"):
        normalize_target(t, "batch")
