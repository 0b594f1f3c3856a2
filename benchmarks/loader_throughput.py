"""How many images/s the worker half of the hybrid data path delivers, with nothing else running:
decode + crop of a ``gpu_throughput.py`` recipe's views in N DataLoader workers, no model, no
device. Compare with a recipe's images/s in training: when the loader alone is not much faster,
the run waits for data; when it is, the training process competes with the workers for the cores.

    python benchmarks/loader_throughput.py --data /tmp/jpegs --recipe simclr_r50 --workers 1,7,14
    python benchmarks/loader_throughput.py --tiny                     # CPU smoke check

Per worker count: images/s over ``--batches`` batches after the first round (one batch per worker)
has arrived, and ms per image per worker (workers × seconds / images).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_throughput import RECIPES, make_jpeg_folder  # noqa: E402


def images_per_s(cfg, workers: int, batches: int) -> float:
    import torch

    from selfsight.augment import resolve_recipe
    from selfsight.data import build_dataset
    from selfsight.data.loader import ViewLoader
    dataset = build_dataset(cfg.data.train)
    recipe = resolve_recipe(cfg.views, cfg.views.size, getattr(dataset, "channels", 3))
    loader = ViewLoader(dataset, recipe, cfg.data.batch_size, torch.device("cpu"), workers=workers,
                        device_augment="on")
    if loader.steps_per_epoch < workers + batches:
        raise SystemExit(f"{len(dataset)} images give {loader.steps_per_epoch} batches: fewer than "
                         f"{workers} + {batches}; lower --batch or --batches")
    it = loader.raw_batches(0)
    for _ in range(max(1, workers)):        # the first round: workers start and fill their queues
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["label"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    from selfsight.resolve import load_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="simclr_r50", choices=list(RECIPES))
    ap.add_argument("--data", default="", help="a folder of images (default: JPEGs made from skimage photos)")
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts")
    ap.add_argument("--batch", type=int, default=0, help="batch (default: the recipe's)")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    ap.add_argument("--tiny", action="store_true", help="tiny images and batches: a CPU smoke check")
    args = ap.parse_args()
    r = RECIPES[args.recipe]
    counts = [int(w) for w in args.workers.split(",")]
    batch = args.batch or (8 if args.tiny else r.batch)
    need = batch * (max(counts) + args.batches + 1)
    data = args.data or make_jpeg_folder(tempfile.mkdtemp(prefix="loader_jpegs_"), need,
                                         *((64, 128) if args.tiny else (256, 480)))
    over = (r.tiny if args.tiny else r.overrides) + [f"data.train={data}", f"data.batch_size={batch}",
                                                     "views.preset=imagenet"]
    cfg = load_config(overrides=over)
    print(f"\n{r.tiny_label if args.tiny else r.label}: worker half only (decode + crop), batch {batch}, "
          f"{os.cpu_count()} CPUs")
    print("| workers | images/s | ms per image per worker |\n|---|---|---|")
    for w in counts:
        ips = images_per_s(cfg, w, args.batches)
        print(f"| {w} | {ips:.0f} | {1000 * max(1, w) / ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
