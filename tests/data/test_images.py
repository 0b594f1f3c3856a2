"""load_image: every pixel mode -> RGB, every kind of broken file -> BrokenImageError."""
from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from selfsight.data import images
from selfsight.data.images import IMAGE_EXTENSIONS, BrokenImageError, load_image, to_rgb


def _real_image_files() -> tuple[list[Path], list[Path]]:
    """Real JPEGs and PNGs shipped by foolbox (or scikit-image); skip when neither is installed."""
    spec = importlib.util.find_spec("foolbox")  # locate only: importing foolbox is slow
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        jpgs, pngs = sorted(d.glob("imagenet_*.jpg")), sorted(d.glob("cifar10_*.png"))
        if jpgs and pngs:
            return jpgs, pngs
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        jpgs = sorted(d.glob("*.jpg"))
        pngs = [d / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png")]
        pngs = [p for p in pngs if p.exists()]
        if jpgs and pngs:
            return jpgs, pngs
    pytest.skip("no real test images: install foolbox or scikit-image")


@pytest.fixture(scope="module")
def real() -> tuple[list[Path], list[Path]]:
    return _real_image_files()


@pytest.fixture(scope="module")
def photo(real) -> Image.Image:
    """A real RGB photo, 128x96, fully decoded."""
    with Image.open(real[0][0]) as im:
        return im.convert("RGB").resize((128, 96))


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------- good images
def test_real_jpeg_and_png(real):
    for path in (real[0][0], real[1][0]):
        out = load_image(path)
        assert out.mode == "RGB"
        with Image.open(path) as ref:
            assert out.size == ref.size
            assert np.array_equal(_arr(out), _arr(ref.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_other_formats(tmp_path, photo, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = _save(photo, tmp_path / f"x.{fmt.lower()}", **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_image(path)
    assert out.mode == "RGB" and np.array_equal(_arr(out), _arr(photo))


def test_grayscale_L(tmp_path, photo):
    gray = photo.convert("L")
    out = load_image(_save(gray, tmp_path / "g.png"))
    a = _arr(out)
    assert out.mode == "RGB"
    assert np.array_equal(a[..., 0], _arr(gray)) and np.array_equal(a[..., 0], a[..., 2])


def test_16bit_png_from_real_image_is_scaled_not_clipped(tmp_path, photo):
    gray8 = np.asarray(photo.convert("L"), dtype=np.uint16)
    img16 = Image.fromarray(gray8 * 257)  # full 16-bit range
    assert img16.mode == "I;16"
    path = _save(img16, tmp_path / "g16.png")
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # a real 16-bit PNG on disk
    out = _arr(load_image(path))
    assert np.abs(out[..., 1] - gray8.astype(np.int16)).max() <= 1
    assert out.max() > 200 and out.min() < 60  # not clipped to 255, not crushed to 0


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16bit_endianness(photo, dtype):
    gray8 = np.asarray(photo.convert("L"), dtype=np.uint16)
    img = Image.fromarray((gray8 * 257).astype(dtype))
    assert img.mode in ("I;16", "I;16B")
    out = _arr(to_rgb(img))
    assert np.abs(out[..., 0] - gray8.astype(np.int16)).max() <= 1


def test_32bit_int_and_float(tmp_path, photo):
    gray8 = np.asarray(photo.convert("L"), dtype=np.int32)
    as_i = Image.fromarray(gray8 * 257)
    assert as_i.mode == "I"
    path = _save(as_i, tmp_path / "i32.tif")
    out = _arr(load_image(path))
    assert np.abs(out[..., 0] - gray8).max() <= 1
    as_f = Image.fromarray(gray8.astype(np.float32) / 255.0)
    assert as_f.mode == "F"
    assert np.abs(_arr(to_rgb(as_f))[..., 0] - gray8).max() <= 1


def test_rgba_composited_on_white(tmp_path, photo):
    rgba = photo.convert("RGBA")
    alpha = np.full(photo.size[::-1], 255, np.uint8)
    alpha[:, :64] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    out = _arr(load_image(_save(rgba, tmp_path / "a.png")))
    assert (out[:, :64] == 255).all()
    assert np.array_equal(out[:, 64:], _arr(photo)[:, 64:])


def test_la_composited_on_white(photo):
    la = photo.convert("LA")
    alpha = np.full(photo.size[::-1], 255, np.uint8)
    alpha[:10] = 0
    la.putalpha(Image.fromarray(alpha))
    out = _arr(to_rgb(la))
    assert (out[:10] == 255).all()
    assert np.array_equal(out[10:, :, 0], _arr(photo.convert("L"))[10:])


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency(tmp_path, photo, ext):
    pal = photo.quantize(16)
    idx = np.asarray(pal)
    key = int(idx[0, 0])
    pal.info["transparency"] = key
    path = _save(pal, tmp_path / f"p.{ext}", transparency=key)
    out = _arr(load_image(path))
    assert (out[idx == key] == 255).all()  # transparent colour became white
    rgb = _arr(pal.convert("RGB"))
    assert np.array_equal(out[idx != key], rgb[idx != key])


def test_palette_without_transparency(tmp_path, photo):
    pal = photo.quantize(64)
    out = load_image(_save(pal, tmp_path / "p.png"))
    assert np.array_equal(_arr(out), _arr(pal.convert("RGB")))
    assert np.abs(_arr(out) - _arr(photo)).mean() < 20


@pytest.mark.parametrize("ext", ["tif", "jpg"])
def test_cmyk(tmp_path, photo, ext):
    out = load_image(_save(photo.convert("CMYK"), tmp_path / f"c.{ext}"))
    assert out.mode == "RGB"
    assert np.abs(_arr(out) - _arr(photo)).mean() < (1 if ext == "tif" else 12)


def test_ycbcr(photo):
    out = to_rgb(photo.convert("YCbCr"))
    assert out.mode == "RGB" and np.abs(_arr(out) - _arr(photo)).mean() < 3


def test_one_bit(tmp_path, photo):
    out = _arr(load_image(_save(photo.convert("1"), tmp_path / "b.png")))
    assert set(np.unique(out).tolist()) == {0, 255}


def test_multiframe_gif_and_tiff_give_first_frame(tmp_path, photo):
    inverted = Image.fromarray(255 - np.asarray(photo))
    gif = tmp_path / "anim.gif"
    photo.save(gif, save_all=True, append_images=[inverted], duration=50)
    tif = tmp_path / "pages.tif"
    photo.save(tif, save_all=True, append_images=[inverted])
    for path in (gif, tif):
        with Image.open(path) as im:
            assert im.n_frames == 2
        out = _arr(load_image(path))
        assert out.shape == (96, 128, 3)
        err_first = np.abs(out - _arr(photo)).mean()
        err_second = np.abs(out - _arr(inverted)).mean()
        assert err_first < 20 < err_second


def test_returned_image_is_independent_of_file(tmp_path, photo):
    path = _save(photo, tmp_path / "x.jpg")
    out = load_image(path)
    os.remove(path)
    out.resize((8, 8)).tobytes()  # still usable after the file is gone


# ---------------------------------------------------------------- broken files
def _assert_broken(path: Path, *words: str) -> BrokenImageError:
    with pytest.raises(BrokenImageError) as info:
        load_image(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == os.fspath(path) and str(path) in str(err)
    for w in words:
        assert w in err.reason.lower()
    return err


def test_truncated_jpeg(tmp_path, real):
    data = real[0][1].read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    _assert_broken(path, "truncated")


def test_truncated_png(tmp_path, real):
    data = real[1][1].read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    _assert_broken(path)


def test_zero_byte(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    _assert_broken(path, "zero-byte")


def test_random_bytes_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_broken(path, "not an image")


def test_text_with_jpg_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    _assert_broken(path, "not an image")


def test_png_header_with_garbage_body(tmp_path, real):
    data = real[1][2].read_bytes()
    path = tmp_path / "garbled.png"
    path.write_bytes(data[:60] + bytes(len(data) - 60))
    _assert_broken(path)


def test_decompression_bomb_max_pixels(tmp_path, photo, monkeypatch):
    path = _save(photo, tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    _assert_broken(path, "decompression bomb")
    monkeypatch.setattr(images, "MAX_PIXELS", None)
    assert load_image(path).size == photo.size


@pytest.mark.parametrize("factor", [1.5, 4])  # PIL warns above its limit, raises above 2x
def test_decompression_bomb_from_pil(tmp_path, photo, monkeypatch, factor):
    path = _save(photo, tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(128 * 96 / factor))
    monkeypatch.setattr(images, "MAX_PIXELS", None)
    _assert_broken(path, "decompression bomb")


def test_missing_file_is_oserror_not_broken(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")


def test_error_pickles_and_extensions():
    err = pickle.loads(pickle.dumps(BrokenImageError("/a/b.jpg", "zero-byte file")))
    assert (err.path, err.reason, str(err)) == ("/a/b.jpg", "zero-byte file", "/a/b.jpg: zero-byte file")
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} == set(IMAGE_EXTENSIONS)
    assert images.is_image_file("A.JPEG") and not images.is_image_file("a.txt")


def test_load_from_uppercase_extension(tmp_path, real):
    path = tmp_path / "PHOTO.JPG"
    path.write_bytes(real[0][2].read_bytes())
    assert load_image(path).mode == "RGB"
