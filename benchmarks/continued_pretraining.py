"""Continued pretraining from weights learned elsewhere against the same model from scratch, on
Fashion-MNIST (docs/usage.md, "Starting weights and continued pretraining").

    python benchmarks/continued_pretraining.py --out runs/continued            # ~50 min on 2 CPU cores

1. The source images: every real photograph available offline that is not Fashion-MNIST (the 20
   ImageNet validation JPEGs and 40 CIFAR test PNGs of foolbox's wheel, scikit-image's photos and
   its 200 LFW faces), the large photos cut into 32x32 tiles at three scales: about 7,300 RGB
   images of natural texture, edges and objects.
2. The source run: the README's recipe (``simclr_fashion_mnist``: SimCLR, resnet10 with the CIFAR
   stem at width 32) on those tiles in RGB, ``--source-steps`` steps.
3. Fashion-MNIST, the same recipe and step budgets, from scratch and from the source run
   (``backbone.weights=SOURCE``: its 3-channel stem folded to one gray channel as timm adapts a
   stem), each for ``--steps`` (default 287 and 957: 3 and 10 minutes of the README's main job on
   the reference machine; step budgets, so that a busy machine changes only the wall time).
4. kNN (k 20, T 0.07) of each run on the 10,000 test images with the 60,000 training images as
   the bank; the source run alone (no Fashion-MNIST training) too.

Prints one markdown table: arm, steps, wall minutes, kNN top-1 and top-5.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "rocket.jpg", "cell.png", "microaneurysms.png")


def _package_data(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)       # locate only: importing foolbox is slow
    return Path(list(spec.submodule_search_locations)[0]) / "data" if spec else None


def make_source_folder(root: Path, tile: int = 32) -> int:
    """Natural photographs (not Fashion-MNIST) as tile x tile RGB PNGs in ``root``; returns the count."""
    root.mkdir(parents=True, exist_ok=True)
    photos, small = [], []
    fb, sk = _package_data("foolbox"), _package_data("skimage")
    if fb is not None:
        photos += sorted(fb.glob("imagenet_*.jpg"))
        small += [Image.open(p).convert("RGB") for p in sorted(fb.glob("cifar*.png"))]
    if sk is not None:
        photos += [sk / n for n in SKIMAGE_PHOTOS if (sk / n).exists()]
        faces = sk / "lfw_subset.npy"
        if faces.exists():
            small += [Image.fromarray((f * 255).astype(np.uint8)).convert("RGB") for f in np.load(faces)]
    if not photos:
        raise SystemExit("no offline photos: pip install foolbox scikit-image (scripts/install.sh --test)")
    n = 0
    for p in photos:
        image = Image.open(p).convert("RGB")
        for short in (96, 192, 384):
            if min(image.size) < short:
                continue
            scale = short / min(image.size)
            im = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC))
            for y in range(0, im.shape[0] - tile + 1, tile):
                for x in range(0, im.shape[1] - tile + 1, tile):
                    Image.fromarray(im[y:y + tile, x:x + tile]).save(root / f"{p.stem}_{short}_{y}_{x}.png")
                    n += 1
    for i, im in enumerate(small):
        im.resize((tile, tile), Image.BICUBIC).save(root / f"small_{i}.png")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/continued")
    ap.add_argument("--steps", type=int, nargs="+", default=[287, 957])
    ap.add_argument("--source-steps", type=int, default=957)
    args = ap.parse_args()
    from selfsight.api import pretrain
    from selfsight.eval.knn import evaluate_knn
    from selfsight.files import safe_load
    from selfsight.resolve import load_config
    out = Path(args.out)
    recipe = "simclr_fashion_mnist"
    tiles = out / "source-images"
    if not tiles.exists():
        print(f"source images: {make_source_folder(tiles)} natural-photo tiles -> {tiles}", flush=True)
    runs = {"source": (out / "source", [f"data.train={tiles}", f"train.steps={args.source_steps}",
                                        "views.crop_scale=[0.2,1.0]", "train.minutes=0"])}
    for steps in args.steps:
        runs[f"scratch-{steps}"] = (out / f"scratch-{steps}", [f"train.steps={steps}", "train.minutes=0"])
        runs[f"continued-{steps}"] = (out / f"continued-{steps}", [f"train.steps={steps}", "train.minutes=0",
                                                                   f"backbone.weights={out / 'source'}"])
    rows = []
    for name, (run, overrides) in runs.items():
        t = time.time()
        ck = run / "checkpoint.pt"
        steps = int(overrides[1 if name == "source" else 0].split("=")[1])
        if not ck.exists() or safe_load(ck)["step"] < steps:     # new, or stopped early: resumed exactly
            res = pretrain(load_config([recipe], overrides), run, resume=ck.exists())
            minutes = res["minutes"]
        else:                                   # finished earlier: its wall time from its own log
            lines = (run / "metrics.jsonl").read_text().splitlines()
            minutes = max((json.loads(x).get("elapsed_min", 0.0) for x in lines if x.strip()), default=float("nan"))
        knn = evaluate_knn(str(run), "fashion-mnist", "fashion-mnist:test", 20, 0.07)
        rows.append((name, overrides[1 if name == "source" else 0].split("=")[1], minutes, knn["top1"], knn["top5"]))
        print(f"{name}: kNN top-1 {knn['top1']:.4f} ({time.time() - t:.0f} s)", flush=True)
    print("\n| run | steps | pretraining min | kNN top-1 | top-5 |\n|---|---|---|---|---|")
    for name, steps, minutes, t1, t5 in rows:
        print(f"| {name} | {steps} | {minutes:.1f} | {t1:.4f} | {t5:.4f} |")


if __name__ == "__main__":
    main()
