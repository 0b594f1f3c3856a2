"""The cost of an I-JEPA training step next to MAE's on the same ViT, in one process: a full step
(the loader's masks, forward, backward, the library's AdamW; the EMA update for I-JEPA) on the same
images, alternating the two methods after warm-up steps. Prints images/s of each and the ratio.

Rows: the Fashion-MNIST recipes (``mae_fashion_mnist``, ``ijepa_fashion_mnist``: the same 6-block
ViT-Tiny on 4 px patches; MAE's 2×128 decoder, I-JEPA's 4×128 predictor), and ViT-B/16 at 224 px
with MAE's 8×512 decoder and a 6×384 I-JEPA predictor (the official ViT-B/16 setting). I-JEPA's
encoder sees the context (about 85 % of the patches minus the 4 target blocks) instead of MAE's
25 %, its target encoder runs on every patch without gradient, and its predictor runs once per
target block: it costs more per step, and the paper's claim is fewer epochs, not cheaper steps.

    python benchmarks/ijepa_vs_mae.py [--steps 4] [--device cpu|cuda] [--rows fmnist,vit_base]
"""
from __future__ import annotations

import argparse
import time

import torch

from selfsight.config import OptimConfig
from selfsight.engine.optim import build_optimizer
from selfsight.engine.trainer import cpu_supports_bf16
from selfsight.methods import build_method
from selfsight.resolve import load_config

ROWS = {   # name: (overrides of both recipes, batch, size, channels)
    "fmnist": ({}, 128, 28, 1),
    "vit_base": ({"backbone.name": "vit_base", "backbone.patch_size": 16, "backbone.depth": 12, "views.size": 224,
                  "method.head.decoder_dim": 512, "method.head.decoder_depth": 8, "method.head.decoder_heads": 16,
                  "method.predictor_dim": 384, "method.predictor_depth": 6, "method.predictor_heads": 12}, 16, 224, 3),
}


def build(method: str, overrides: dict, size: int, channels: int, device):
    keep = {k: v for k, v in overrides.items()
            if not k.startswith("method.") or k.startswith("method.head.") == (method == "mae")}
    cfg = load_config([f"{method}_fashion_mnist"], [f"{k}={v}" for k, v in keep.items()])
    torch.manual_seed(0)
    model = build_method(cfg, channels, size).to(device)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05), device)
    return model, opt, model.make_masker()


def step(model, opt, masker, x, seed: int, dtype) -> None:
    batch = {"views": [x], "masks": masker([x], seed)}
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = model.training_step(batch, {})["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(model, "after_step"):
        model.after_step({"momentum": 0.996})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="fmnist,vit_base")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or cpu_supports_bf16() else None
    print(f"| row | batch | MAE img/s | I-JEPA img/s | I-JEPA / MAE | ({args.device}, "
          f"{'bf16' if dtype else 'fp32'}, {args.steps} steps after {args.warmup}) |")
    print("|---|---|---|---|---|---|")
    for name in args.rows.split(","):
        overrides, batch, size, channels = ROWS[name]
        x = torch.randn(batch, channels, size, size, device=device)
        runs = {m: build(m, overrides, size, channels, device) for m in ("mae", "ijepa")}
        took = {m: 0.0 for m in runs}
        for i in range(args.warmup + args.steps):
            for m, (model, opt, masker) in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(model, opt, masker, x, i, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    took[m] += time.perf_counter() - t0
        rate = {m: batch * args.steps / t for m, t in took.items()}
        print(f"| {name} | {batch} | {rate['mae']:.0f} | {rate['ijepa']:.0f} | {rate['ijepa'] / rate['mae']:.2f} | |")


if __name__ == "__main__":
    main()
