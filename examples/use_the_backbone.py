"""Pretrain briefly, export the backbone, load it back, embed a folder of images, find neighbours.

    python examples/use_the_backbone.py --minutes 2 --out runs/example
    python examples/use_the_backbone.py --steps 20 --out /tmp/example      # a smoke run

Everything goes through the public API (docs/api.md). The folder embedded here is 500
Fashion-MNIST test images written as PNGs (pass --images DIR to embed your own folder).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import selfsight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=0, help="a step budget instead of --minutes")
    ap.add_argument("--images", help="a folder of images to embed (default: 500 Fashion-MNIST test images)")
    args = ap.parse_args()
    out = Path(args.out)

    # 1. pretrain: the bundled SimCLR recipe for Fashion-MNIST, with a short budget
    budget = {"train.steps": args.steps} if args.steps else {"train.minutes": args.minutes}
    run = out / "run"
    if not (run / "checkpoint.pt").exists():
        res = selfsight.pretrain("simclr_fashion_mnist", run, overrides={**budget, "train.progress": False})
        print(f"pretrained {res['steps']} steps -> {run}")

    # 2. export the evaluation backbone alone (no projector), with its metadata in the header
    meta = selfsight.export(run, out / "backbone.safetensors")
    print(f"exported {meta['backbone']} ({meta['feature_dim']}-d features, {meta['image_size']} px) "
          f"-> {out / 'backbone.safetensors'}")
    selfsight.export(run, out / "backbone_torchvision.safetensors", format="torchvision")
    print("torchvision equivalent:", meta["torchvision"]["build"])

    # 3. load it back: a module in eval mode plus the preprocessing it expects
    net, preprocess = selfsight.load_backbone(out / "backbone.safetensors")
    images = out / "images"
    if args.images:
        images = Path(args.images)
    elif not images.exists():
        from PIL import Image
        from selfsight.data import build_dataset
        test = build_dataset("fashion-mnist:test")
        images.mkdir(parents=True)
        for i in range(500):
            Image.fromarray(test.images[i, 0].numpy()).save(images / f"{i:04d}.png")
    first = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
    from PIL import Image
    with torch.no_grad():
        f = net(preprocess(Image.open(first))[None])
    print(f"features of {first.name}: {tuple(f.shape)}")

    # 4. embed the whole folder (resumable: run again after an interruption)
    res = selfsight.embed(out / "backbone.safetensors", images, out / "embeddings.npy", workers=0)
    print(f"{res['count']} embeddings -> {res['written'][0]}")

    # 5. nearest neighbours of the first image, with a picture
    rows = selfsight.neighbors(out / "embeddings.npy", 0, k=8, picture=out / "neighbors.png")
    for r in rows:
        print(f"  {r['rank']}  {r['score']:.3f}  {r['file']}")
    print(f"picture -> {out / 'neighbors.png'}")


if __name__ == "__main__":
    main()
