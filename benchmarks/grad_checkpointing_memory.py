"""backbone.grad_checkpointing: activation memory and step time with and without it.

For a ViT (or ResNet) at ``--size`` px: the bytes autograd keeps for backward (saved tensors
outside checkpointed segments), the process's peak resident memory (each mode in its own
process) and the forward+backward time.

    .venv/bin/python benchmarks/grad_checkpointing_memory.py --backbone vit_small --size 64 --patch 8 --batch 64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run(args, on: bool) -> dict:
    from selfsight.backbones.resnet import ResNetBackbone
    from selfsight.backbones.vit import ViTBackbone
    torch.manual_seed(0)
    if args.backbone.startswith("vit"):
        net = ViTBackbone(args.backbone, img_size=args.size, patch_size=args.patch, grad_checkpointing=on)
    else:
        net = ResNetBackbone(args.backbone, 3, "cifar", grad_checkpointing=on)
    x = torch.randn(args.batch, 3, args.size, args.size)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t
    times = []
    for i in range(3):
        kept[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            f = net.forward_features(x)
        (f.cls.square().mean() + f.patch.mean()).backward()
        times.append(time.perf_counter() - t0)
    return {"grad_checkpointing": on, "saved_MiB": kept[0] / 2**20, "step_s": min(times[1:]),
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mode", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run(args, args.mode == "on")))
        return
    for mode in ("off", "on"):      # one process each: peak RSS is per process
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                             text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
