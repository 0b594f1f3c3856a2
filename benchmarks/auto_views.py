"""A folder of small images under ``views.preset=auto``: as fast as the explicit small-image settings?

    python benchmarks/auto_views.py --steps 8 --batch-size 16

Writes a folder of 40 px images (real Fashion-MNIST garments, resized, RGB, in class folders),
then pretrains SimCLR on it in this process three times with the same model (resnet18) and batch:
``auto`` (the defaults: the view size and stem are chosen from the images), the explicit small
settings (``views.preset=small backbone.small_stem=cifar``), and the ImageNet recipe the folder
got before ``auto`` looked at image sizes (``views.preset=imagenet backbone.small_stem=none``,
224 px). Prints seconds per step (median of the logged steps after the first two) and the ratio
to the explicit small settings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

ROWS = {
    "auto (defaults)": [],
    "explicit small": ["views.preset=small", "backbone.small_stem=cifar"],
    "ImageNet recipe (before)": ["views.preset=imagenet", "backbone.small_stem=none"],
}


def make_folder(root: Path, n: int, size: int = 40) -> Path:
    from selfsight.data import build_dataset
    fm = build_dataset("fashion-mnist", download=False)
    for i in range(n):
        d = root / f"class_{int(fm.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fm.images[i, 0].numpy()).convert("RGB").resize((size, size)).save(d / f"{i}.png")
    return root


def seconds_per_step(folder: Path, out: Path, extra: list[str], steps: int, batch: int) -> tuple[float, int]:
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    cfg = load_config(None, [f"data.train={folder}", f"data.batch_size={batch}", f"train.steps={steps}",
                             "train.log_every=1", "train.progress=false", "train.tensorboard=false",
                             "data.workers=2", *extra])
    t0 = time.perf_counter()
    pretrain(cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    size = __import__("torch").load(out / "checkpoint.pt", weights_only=True)["meta"]["preprocess"]["size"]
    per_step = [batch / r["images_per_s"] for r in rows[2:]] or [(time.perf_counter() - t0) / steps]
    return statistics.median(per_step), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="selfsight-auto-views-") as tmp:
        folder = make_folder(Path(tmp) / "images", args.images)
        results = {}
        for i, (name, extra) in enumerate(ROWS.items()):
            results[name] = seconds_per_step(folder, Path(tmp) / f"run{i}", extra, args.steps, args.batch_size)
    base = results["explicit small"][0]
    print(f"\nSimCLR resnet18, batch {args.batch_size}, a folder of {args.images} images of 40x40 px "
          f"(median s/step of steps 3-{args.steps})\n")
    print("| settings | view size | s/step | vs explicit small |\n|---|---|---|---|")
    for name, (sec, size) in results.items():
        print(f"| {name} | {size} px | {sec:.3f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()
