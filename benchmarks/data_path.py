"""Data path speed: per-sample vs hybrid vs memmap cache vs tar shards, for a short SimCLR run.

Makes a folder of real JPEGs at ImageNet-like sizes (random 256-500 px crops of scikit-image's
photos, or upsampled CIFAR-10 images from foolbox when scikit-image is missing), then trains
SimCLR (resnet18) for a few steps per path and prints images/s and the share of step time spent
waiting for data (the trainer's ``data_wait``).

    .venv/bin/python benchmarks/data_path.py --images 2000 --size 112 --steps 20

The images/s and data wait are those of the second half of the steps (workers started).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def photos() -> list[Image.Image]:
    import importlib.util
    spec = importlib.util.find_spec("skimage")
    if spec is not None:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "immunohistochemistry.png", "retina.jpg", "logo.png")
        out = [Image.open(d / n).convert("RGB") for n in names if (d / n).exists()]
        if out:
            return out
    spec = importlib.util.find_spec("foolbox")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [Image.open(p).convert("RGB").resize((512, 512), Image.BICUBIC) for p in sorted(d.glob("*.png"))]


def make_folder(root: Path, n: int) -> None:
    rng = random.Random(0)
    srcs = photos()
    for i in range(n):
        src = srcs[i % len(srcs)]
        side = rng.randint(256, 500)
        w, h = src.size
        s = min(side, w, h)
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        img = src.crop((x, y, x + s, y + s)).resize((side, rng.randint(int(side * 0.75), side)), Image.BILINEAR)
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)


def run(name: str, data: str, out: Path, args, extra: dict) -> dict:
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    over = {"method.name": "simclr", "backbone.name": "resnet18", "data.train": data, "views.size": args.size,
            "views.preset": "imagenet", "data.batch_size": args.batch, "data.workers": args.workers,
            "train.steps": args.steps, "train.log_every": max(1, args.steps // 2), "train.progress": False,
            "train.tensorboard": False, "train.precision": "fp32", **extra}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in over.items()])
    t0 = time.perf_counter()
    pretrain(cfg, out / name)
    wall = time.perf_counter() - t0
    row = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()][-1]
    return {"path": name, "images/s": row.get("images_per_s", float("nan")), "data_wait": row.get("data_wait"),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--keep", help="reuse/keep this work folder")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="selfsight-data-path-"))
    os.environ["SELFSIGHT_CACHE"] = str(work / "cache")
    folder, shards, runs = work / "images", work / "shards", work / "runs"
    if not folder.exists():
        t = time.perf_counter()
        make_folder(folder, args.images)
        print(f"made {args.images} JPEGs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not shards.exists():
        from selfsight.data import build_dataset
        from selfsight.data.shards import write_shards
        write_shards(build_dataset(str(folder)), str(shards), 500)
    shutil.rmtree(runs, ignore_errors=True)
    rows = [run("per-sample (off)", str(folder), runs, args, {"data.device_augment": "off"}),
            run("hybrid (auto)", str(folder), runs, args, {})]
    t = time.perf_counter()
    run("cache build", str(folder), runs, args, {"data.cache": True, "train.steps": 1})
    build = time.perf_counter() - t
    rows.append(run("memmap cache (2nd run)", str(folder), runs, args, {"data.cache": True}))
    rows.append(run("tar shards (hybrid)", str(shards), runs, args, {}))
    print(f"\n{args.images} JPEGs 256-500 px, SimCLR resnet18, {args.size} px views, batch {args.batch}, "
          f"{args.workers} workers, {args.steps} steps; cache build run {build:.0f} s")
    print("| path | images/s | data wait (share of step) |\n| --- | ---: | ---: |")
    for r in rows:
        wait = "n/a" if r["data_wait"] is None else f"{100 * r['data_wait']:.0f} %"
        print(f"| {r['path']} | {r['images/s']:.1f} | {wait} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
