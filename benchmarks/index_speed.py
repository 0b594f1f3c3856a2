"""Time ImageFolder indexing, cold (full scan) and warm (cached index).

    python benchmarks/index_speed.py --n 200000

Builds N hard-linked 1-byte ``.jpg`` files in ``class_*/part_*/`` folders of a temp
dir (images are never opened while indexing, so their content does not matter).
"Cold" means no index cache; the OS's directory cache is warm in both runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from selfsight.data.folder import ImageFolder


def make_files(root: str, n: int, per_dir: int = 500, per_class: int = 2000) -> None:
    """N files, ``per_dir`` per leaf folder, ``per_class`` per first-level folder."""
    made = 0
    c = 0
    while made < n:
        class_dir = os.path.join(root, f"class_{c:04d}")
        os.makedirs(class_dir)
        source = os.path.join(class_dir, "source.bin")  # one inode per class: link limits
        with open(source, "wb") as f:
            f.write(b"x")
        for p in range(-(-min(per_class, n - made) // per_dir)):
            part = os.path.join(class_dir, f"part_{p:03d}")
            os.mkdir(part)
            for _ in range(min(per_dir, n - made)):
                os.link(source, os.path.join(part, f"img_{made:08d}.jpg"))
                made += 1
        c += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="number of image files")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs (best is reported)")
    ap.add_argument("--dir", default=None, help="parent folder for the temp tree")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="selfsight-index-bench-", dir=args.dir)
    try:
        root, cache = os.path.join(tmp, "data"), os.path.join(tmp, "cache")
        os.mkdir(root)
        t = time.perf_counter()
        make_files(root, args.n)
        made_s = time.perf_counter() - t
        time.sleep(2.1)  # folders modified within 2 s of a scan are never trusted from cache

        t = time.perf_counter()
        cold = ImageFolder(root, cache_dir=cache)
        cold_s = time.perf_counter() - t
        assert not cold.from_cache and len(cold) == args.n, cold.summary()

        warm_s = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            warm = ImageFolder(root, cache_dir=cache)
            warm_s = min(warm_s, time.perf_counter() - t)
            assert warm.from_cache and len(warm) == args.n
        cache_mb = sum(e.stat().st_size for e in os.scandir(os.path.join(cache, "index"))) / 2**20

        print(f"created {args.n} files in {made_s:.1f} s; {len(cold.classes)} classes; "
              f"cache file {cache_mb:.1f} MiB")
        print(f"{'files':>10} {'cold s':>8} {'warm s':>8} {'cold files/s':>13} {'warm files/s':>13}")
        print(f"{args.n:>10} {cold_s:>8.2f} {warm_s:>8.3f} "
              f"{args.n / cold_s:>13,.0f} {args.n / warm_s:>13,.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
