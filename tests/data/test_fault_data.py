"""Hostile data in a folder (fuzzed with hypothesis): random and truncated bytes, decompression
bombs (a PNG header declaring 100000x100000 pixels), wrong extensions, symlink loops, links out
of the root, dangling links and unreadable files. The folder source never crashes: it skips and
counts them, and never reads outside the data root through a link unless asked to."""
import io
import os
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from helpers import tiny_overrides
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import selfsight.data.folder as folder_mod
from selfsight.data.folder import ImageFolder
from selfsight.data.images import IMAGE_EXTENSIONS
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
KINDS = ["good", "jpeg_as_png", "random", "truncated", "bomb", "wrong_ext", "loop", "outside", "dangling",
         "unreadable"]


@pytest.fixture(scope="module")
def pngs(fmnist_small) -> list[bytes]:
    out = []
    for i in range(16):
        buf = io.BytesIO()
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height gray pixels (a few bytes of data follow)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="JPEG")
    return buf.getvalue()


def build(root: Path, outside: Path, entries, pngs) -> dict:
    """Write the entries into ``root``; returns what the folder source must report."""
    expect = {"indexed": 0, "broken": 0, "non_image": 0, "zero_byte": 0, "outside_root": 0, "broken_link": 0,
              "symlinked_dir": 0}
    for n, (kind, blob, number) in enumerate(entries):
        png = pngs[number % len(pngs)]
        ext = sorted(IMAGE_EXTENSIONS)[number % len(IMAGE_EXTENSIONS)]
        path = root / f"f{n}"
        if kind in ("good", "unreadable"):
            (root / f"f{n}.png").write_bytes(png)
            if kind == "unreadable":
                os.chmod(root / f"f{n}.png", 0)
            expect["indexed"] += 1
            expect["broken"] += kind == "unreadable" and not ROOT_USER       # root reads a mode-000 file
        elif kind == "jpeg_as_png":                  # the content decides, not the name
            (root / f"f{n}.png").write_bytes(jpeg(png))
            expect["indexed"] += 1
        elif kind == "random":
            Path(f"{path}{ext}").write_bytes(b"\x00" + blob)    # never a valid image's first byte
            expect["indexed"] += 1
            expect["broken"] += 1
        elif kind == "truncated":
            cut = number % max(1, len(png) - 40)
            Path(f"{path}.png").write_bytes(png[:cut])
            expect["indexed" if cut else "zero_byte"] += 1
            expect["broken"] += bool(cut)
        elif kind == "bomb":
            side = 10_000 + number % 90_001               # 10000..100000 per side: >= 1e8 pixels > PIL's limit
            Path(f"{path}.png").write_bytes(bomb(side, side))
            expect["indexed"] += 1
            expect["broken"] += 1
        elif kind == "wrong_ext":
            Path(f"{path}.txt").write_bytes(png)
            expect["non_image"] += 1
        elif kind == "loop":
            os.symlink(root, path)                    # a folder link back to the root
            expect["symlinked_dir"] += 1
        elif kind == "outside":
            os.symlink(outside, f"{path}.png")          # a real image outside the root
            expect["outside_root"] += 1
        elif kind == "dangling":
            os.symlink(root / "no-such-file.png", f"{path}.png")
            expect["broken_link"] += 1
    return expect


def check(root: Path, outside: Path, entries, pngs, monkeypatch) -> None:
    expect = build(root, outside, entries, pngs)
    opened = []
    real_load = folder_mod.load_image

    def spy(path):
        opened.append(os.path.realpath(path))
        return real_load(path)
    monkeypatch.setattr(folder_mod, "load_image", spy)
    ds = ImageFolder(root, cache_dir=root.parent / "cache", refresh=True)
    assert len(ds) == expect["indexed"]
    for reason in ("non_image", "zero_byte", "outside_root", "broken_link", "symlinked_dir"):
        assert ds.skip_counts[reason] == expect[reason], (reason, ds.summary())
    for i in range(len(ds)):                      # every index gives a decoded image (a bad one: the next)
        item = ds[i]
        assert item["image"].mode == "RGB" and item["image"].size == (28, 28)
    assert ds.summary()["broken_at_load"] == expect["broken"]
    real_root = os.path.realpath(root)
    assert opened and all(p.startswith(real_root + os.sep) for p in opened), opened


entry = st.tuples(st.sampled_from(KINDS), st.binary(max_size=300), st.integers(0, 10**6))


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(entry, max_size=10), n_good=st.integers(1, 3))
def test_folder_source_skips_and_counts_hostile_files(pngs, monkeypatch, entries, n_good):
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp) / "data", Path(tmp) / "secret.png"
        root.mkdir()
        outside.write_bytes(pngs[0])
        try:
            check(root, outside, [("good", b"", i) for i in range(n_good)] + entries, pngs, monkeypatch)
        finally:
            for p in root.iterdir():            # let the temporary folder be removed (mode 000 files)
                if not p.is_symlink():
                    os.chmod(p, 0o644)


@pytest.mark.skipif(ROOT_USER, reason="root reads mode-000 files: nothing is unreadable to it")
def test_unreadable_files_are_skipped(tmp_path, pngs, monkeypatch):
    outside = tmp_path / "secret.png"
    outside.write_bytes(pngs[0])
    (tmp_path / "data").mkdir()
    check(tmp_path / "data", outside, [("good", b"", 0), ("unreadable", b"", 1), ("unreadable", b"", 2)], pngs,
          monkeypatch)


def test_links_out_of_the_root_are_read_only_when_asked(tmp_path, pngs):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(pngs[i])
        (elsewhere / f"{i}.png").write_bytes(pngs[8 + i])
    os.symlink(elsewhere / "0.png", root / "out.png")
    os.symlink(elsewhere, root / "outdir")
    os.symlink(root, root / "loop")
    kept = ImageFolder(root, cache_dir=tmp_path / "c1")
    assert len(kept) == 3 and kept.skip_counts["outside_root"] == 1 and kept.skip_counts["symlinked_dir"] == 2
    asked = ImageFolder(root, cache_dir=tmp_path / "c2", follow_symlinks=True)
    assert len(asked) == 3 + 1 + 3 and asked.skip_counts["loop"] == 1     # the loop is seen once, not walked


def test_a_link_retargeted_after_indexing_is_not_followed_out(tmp_path, pngs):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(pngs[i])
    os.symlink(root / "0.png", root / "link.png")          # inside the root when indexed
    ds = ImageFolder(root, cache_dir=tmp_path / "cache")
    assert len(ds) == 4
    (tmp_path / "secret.png").write_bytes(pngs[9])
    os.remove(root / "link.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")   # now it points out
    link = [i for i in range(len(ds)) if ds.samples[i][0] == "link.png"][0]
    item = ds[link]
    assert item["skipped"] == 1 and ds.summary()["broken_at_load"] == 1
    assert item["image"].tobytes() != Image.open(io.BytesIO(pngs[9])).convert("RGB").tobytes()


def test_training_on_a_hostile_folder_runs_and_counts_the_skips(tmp_path, pngs):
    import json
    root = tmp_path / "data"
    root.mkdir()
    for i in range(40):
        (root / f"good{i}.png").write_bytes(pngs[i % len(pngs)])
        (root / f"bad{i}.png").write_bytes(pngs[i % len(pngs)][: 30 + i] if i % 2 else bomb(60_000, 60_000))
    (root / "notes.txt").write_text("not an image")
    os.symlink(root, root / "loop")
    cfg = load_config(overrides=tiny_overrides(**{"data.train": str(root), "data.workers": 0, "train.steps": 2,
                                                  "train.log_every": 1, "views.preset": "small"}))
    assert pretrain(cfg, tmp_path / "run")["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_files"] for r in rows) > 0
