"""MaskFeat HOG target (``selfsight/targets/hog.py``) against an independent numpy reference.

The reference follows the written description (SlowFast ``HOGLayerC``) with explicit loops: Sobel
responses as cross-correlation sums over the 3×3 kernel on the reflect-padded image (conv2d is a
cross-correlation), np.arctan2, floor mod nbins, per-cell loops accumulating each pixel's magnitude
into its bin, per-cell L2 norm. It runs in float64 on the same float32 input.

Bin edges: a pixel whose phase lies within rounding of an integer may land in the neighbouring
bin when float32 sums round differently from float64 (measured on the plain float32 uint8 crops:
1-3 % of the cells differ, every one holding a pixel within 1e-4 bin of an edge, mostly gx a
rounding residue of a true 0, i.e. bin 0 against bin 8). The strict tests therefore snap the
normalized photo to a 2^-12 grid (a change below 1.3e-4; the uint8 step is 1/255/0.229 ≈ 0.017):
every Sobel sum is then exact in float32 and float64, and only pixels within 1e-4 bin of an
oblique edge stay ambiguous; the reference flags them, their cells get a loose bound, and their
share is asserted below 0.1 % of the pixels (measured: at most 9 of 27,648).
``test_unsnapped_photos_differ_only_at_bin_edges`` covers the plain float32 input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from selfsight.targets.hog import HOG

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
GX = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
GY = GX.T.copy()
PHOTOS = [("astronaut", 96, "crop"), ("chelsea", 96, "crop"), ("coffee", 96, "crop"),
          ("astronaut", 64, "resize"), ("chelsea", 64, "resize"), ("coffee", 64, "resize")]


def _rgb01(name: str, size: int, mode: str) -> np.ndarray:
    """A real RGB photo as H×W×3 float32 in [0, 1]: a centre crop (uint8 levels kept) or a resize."""
    img = getattr(data, name)()
    if mode == "crop":
        h, w = img.shape[:2]
        t, l = (h - size) // 2, (w - size) // 2
        return img[t:t + size, l:l + size].astype(np.float32) / 255.0
    return resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def _snap(x: np.ndarray) -> np.ndarray:
    return (np.round(x * 4096) / 4096).astype(np.float32)


def photo(name: str, size: int, mode: str, snap: bool = True) -> np.ndarray:
    """3×H×W float32, ImageNet mean/std-normalized (then snapped to the 2^-12 grid)."""
    x = ((_rgb01(name, size, mode) - MEAN) / STD).transpose(2, 0, 1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _snap(x) if snap else x


def gray(size: int) -> np.ndarray:
    """1×H×W: the camera man photo resized, normalized with the mean/std of the ImageNet gray."""
    x = resize(data.camera(), (size, size), anti_aliasing=True).astype(np.float32)
    return _snap(((x - np.float32(0.449)) / np.float32(0.226))[None])


def reference(x: np.ndarray, nbins: int, cell: int):
    """x: C×H×W → (C×nbins×h×w histograms, C×h×w cells holding an ambiguous pixel, their count).

    Ambiguous: magnitude > 0 and phase within 1e-4 bin of an integer that it does not equal (an
    exact integer, e.g. gx = 0 exactly, is computed exactly by both sides).
    """
    c, hh, ww = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    gx = np.zeros((c, hh, ww))
    gy = np.zeros((c, hh, ww))
    for u in range(3):                       # cross-correlation: g[i, j] = Σ k[u, v] · xp[i+u, j+v]
        for v in range(3):
            gx += GX[u, v] * xp[:, u:u + hh, v:v + ww]
            gy += GY[u, v] * xp[:, u:u + hh, v:v + ww]
    mag = np.sqrt(gx ** 2 + gy ** 2)
    phase = np.arctan2(gx, gy) / np.pi * nbins
    bins = np.mod(np.floor(phase).astype(np.int64), nbins)
    dist = np.abs(phase - np.round(phase))
    ambiguous = (mag > 0) & (dist < 1e-4) & (dist > 0)
    h, w = hh // cell, ww // cell
    out = np.zeros((c, nbins, h, w))
    flagged = np.zeros((c, h, w), dtype=bool)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                rows, cols = slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell)
                for b, m in zip(bins[ch, rows, cols].ravel(), mag[ch, rows, cols].ravel()):
                    out[ch, b, i, j] += m
                norm = np.sqrt((out[ch, :, i, j] ** 2).sum())
                if norm > 0:
                    out[ch, :, i, j] /= norm
                flagged[ch, i, j] = ambiguous[ch, rows, cols].any()
    return out, flagged, int(ambiguous.sum())


def hist(x: np.ndarray, **kw) -> np.ndarray:
    out = HOG(channels=x.shape[0], **kw).histograms(torch.from_numpy(x)[None])
    assert out.dtype == torch.float32
    return out[0].numpy()


def assert_matches(got, ref, flagged, n_ambiguous, n_pixels):
    """got/ref: C×nbins×h×w. Strict (1e-4 relative) on every cell without an ambiguous pixel."""
    assert got.shape == ref.shape
    assert n_ambiguous <= 1e-3 * n_pixels, f"{n_ambiguous} ambiguous pixels of {n_pixels}"
    strict = np.broadcast_to(~flagged[:, None], got.shape)
    np.testing.assert_allclose(got[strict], ref[strict], rtol=1e-4, atol=1e-6)
    # a flagged cell can only have moved a few pixels' magnitudes to a neighbouring bin
    assert np.abs(got - ref)[~strict].max(initial=0.0) < 0.5


@pytest.mark.parametrize("name,size,mode", PHOTOS)
def test_matches_reference_on_photos(name, size, mode):
    x = photo(name, size, mode)
    got = hist(x)
    assert got.shape == (3, 9, size // 8, size // 8)
    ref, flagged, n_amb = reference(x, 9, 8)
    assert_matches(got, ref, flagged, n_amb, x.size)


@pytest.mark.parametrize("nbins", [9, 6])
def test_matches_reference_gray_cell4(nbins):
    x = gray(64)
    got = hist(x, nbins=nbins, cell=4)
    assert got.shape == (1, nbins, 16, 16)
    ref, flagged, n_amb = reference(x, nbins, 4)
    assert_matches(got, ref, flagged, n_amb, x.size)


def test_unsnapped_photos_differ_only_at_bin_edges():
    """Plain float32 input: the cells that differ from the reference all hold an ambiguous pixel."""
    for name, size, mode in PHOTOS:
        x = photo(name, size, mode, snap=False)
        got = hist(x)
        ref, flagged, _ = reference(x, 9, 8)
        bad = (np.abs(got - ref) > 1e-4 + 1e-4 * np.abs(ref)).any(axis=1)    # C×h×w
        assert not (bad & ~flagged).any(), (name, mode)
        assert bad.mean() < 0.05, (name, mode, bad.mean())
        assert np.abs(got - ref).max() < 0.5


def test_forward_patch_vectors():
    """224 px photo, 16 px patches, 8 px cells: 196 patches × 108 = 3 channels × 9 bins × 2 × 2 cells;
    patch (i, j) holds cells (2i..2i+1, 2j..2j+1) at index ((c·9 + b)·2 + cy)·2 + cx."""
    x = photo("chelsea", 224, "resize")
    hog = HOG()
    out = hog(torch.from_numpy(x)[None], 16)
    assert out.shape == (1, 196, 108) and out.dtype == torch.float32
    ref, flagged, n_amb = reference(x, 9, 8)
    assert n_amb <= 1e-3 * x.size
    expected = np.zeros((196, 108))
    loose = np.zeros((196, 108), dtype=bool)
    for i in range(14):
        for j in range(14):
            for c in range(3):
                for b in range(9):
                    for cy in range(2):
                        for cx in range(2):
                            idx = ((c * 9 + b) * 2 + cy) * 2 + cx
                            expected[i * 14 + j, idx] = ref[c, b, 2 * i + cy, 2 * j + cx]
                            loose[i * 14 + j, idx] = flagged[c, 2 * i + cy, 2 * j + cx]
    got = out[0].numpy()
    np.testing.assert_allclose(got[~loose], expected[~loose], rtol=1e-4, atol=1e-6)
    assert np.abs(got - expected).max() < 0.5
    # and forward is a pure re-arrangement of histograms()
    h = hog.histograms(torch.from_numpy(x)[None])
    assert torch.equal(out[0, 3 * 14 + 5, (1 * 9 + 7) * 4 + 1 * 2 + 0], h[0, 1, 7, 7, 10])  # c=1, b=7, cy=1, cx=0


def test_batch_and_patch_sizes():
    xs = torch.from_numpy(np.stack([photo(n, 64, "resize") for n in ("astronaut", "chelsea", "coffee")]))
    hog = HOG()
    out = hog(xs, 32)                                      # 2×2 patches of 4×4 cells
    assert out.shape == (3, 4, 3 * 9 * 16)
    for k in range(3):
        torch.testing.assert_close(out[k:k + 1], hog(xs[k:k + 1], 32), rtol=1e-5, atol=1e-6)
    assert hog(xs, 8).shape == (3, 64, 27)


def test_unit_norm_flat_cells_zero_and_constant_image():
    x = photo("astronaut", 64, "resize")
    x[:, 16:40, 8:40] = 0.25                                  # flat block: cells (3, 2..3) see only it
    h = hist(x)
    norms = np.sqrt((h ** 2).sum(axis=1))                     # C×h×w
    assert np.all(norms[:, 3, 2:4] == 0)
    others = np.ones_like(norms, dtype=bool)
    others[:, 3, 2:4] = False
    np.testing.assert_allclose(norms[others], 1.0, rtol=1e-5)
    const = torch.full((2, 3, 32, 48), -0.7)
    assert torch.equal(HOG().histograms(const), torch.zeros(2, 3, 9, 4, 6))
    assert torch.equal(HOG()(const, 16), torch.zeros(2, 6, 108))


def test_no_parameters_nothing_in_state_dict():
    hog = HOG()
    assert list(hog.parameters()) == [] and len(hog.state_dict()) == 0
    assert list(hog.buffers()) == []
    x = torch.from_numpy(photo("coffee", 64, "resize"))[None]
    torch.testing.assert_close(hog(x.double(), 16), HOG()(x, 16))     # still computed in float32
    assert hog(x.double(), 16).dtype == torch.float32


def test_float32_under_autocast():
    """A bfloat16 input under autocast still gives float32 histograms of the bf16 values."""
    x = torch.from_numpy(photo("chelsea", 64, "resize"))[None].bfloat16()
    ref = HOG()(x.float(), 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = HOG()(x, 16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_normalization_cancels_per_channel():
    """The docstring's claim: per channel, mean/std normalization changes the target only by rounding."""
    raw = _rgb01("coffee", 64, "resize")
    norm = ((raw - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)
    a, b = hist(np.ascontiguousarray(norm)), hist(np.ascontiguousarray(raw.transpose(2, 0, 1)))
    close = np.isclose(a, b, rtol=1e-4, atol=1e-5).all(axis=1)
    assert close.mean() > 0.97


def test_errors():
    hog = HOG()
    with pytest.raises(ValueError, match="channels"):
        hog(torch.zeros(1, 1, 32, 32), 16)
    with pytest.raises(ValueError, match="patch size 16"):
        hog(torch.zeros(1, 3, 40, 32), 16)
    with pytest.raises(ValueError, match="patch size 16"):
        hog(torch.zeros(1, 3, 32, 40), 16)
    with pytest.raises(ValueError, match="multiple of the cell size 8"):
        hog(torch.zeros(1, 3, 36, 36), 12)
    with pytest.raises(ValueError, match="cell size 8"):
        hog.histograms(torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match="B×C×H×W"):
        hog(torch.zeros(3, 32, 32), 16)
