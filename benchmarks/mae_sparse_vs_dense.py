"""MAE's sparse encoder against the same ViT encoding every token (He et al. 2022, §3 and
Table 1c: "encoder w/ [M]"), in one process: a full training step (forward, backward, the
library's AdamW: fused, as the trainer builds it) with 75 % random masking, the same decoder and loss on both sides; only the encoder input
differs (sparse: the 25 % visible patches; dense: all patches, mask tokens at the masked ones).

Rows: the Fashion-MNIST recipe (6-block ViT-Tiny, 4 px patches at 28 px, 2×128 decoder), and
MAE's ViT-B/16 and ViT-L/16 at 224 px with its 8×512 decoder (the decoder's share of the work
bounds the gain: about 2.4x for ViT-B, 3.2x for ViT-L by FLOPs; MAE Table 2 measured 2.8x for
ViT-L). Prints images/s per side and their ratio
(and peak memory on CUDA). Steps are timed after warm-up steps, sparse and dense alternating.

    python benchmarks/mae_sparse_vs_dense.py [--steps 4] [--device cpu|cuda] [--rows fmnist,vit_base]
"""
from __future__ import annotations

import argparse
import time

import torch

from selfsight.backbones.vit import ViTBackbone
from selfsight.config import OptimConfig
from selfsight.engine.optim import build_optimizer
from selfsight.engine.trainer import cpu_supports_bf16
from selfsight.masking import MaskGenerator
from selfsight.methods.mim import MIM, MIMParams

ROWS = {   # name: (vit, depth, patch, size, channels, batch, decoder dim, depth, heads)
    "fmnist": ("vit_tiny", 6, 4, 28, 1, 256, 128, 2, 4),
    "vit_base": ("vit_base", 0, 16, 224, 3, 16, 512, 8, 16),
    "vit_large": ("vit_large", 0, 16, 224, 3, 8, 512, 8, 16),
}


def build(row: tuple, sparse: bool, device) -> MIM:
    name, depth, patch, size, ch, _, dd, ddepth, dheads = row
    torch.manual_seed(0)
    vit = ViTBackbone(name, img_size=size, patch_size=patch, in_chans=ch, depth=depth, pos_embed="sincos")
    p = MIMParams(student_input="sparse" if sparse else "dense")
    p.head.decoder_dim, p.head.decoder_depth, p.head.decoder_heads = dd, ddepth, dheads
    return MIM(p, vit).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="fmnist,vit_base,vit_large")
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    print(f"device {device}, threads {torch.get_num_threads()}, precision {'bf16' if bf16 else 'fp32'}, "
          f"mask ratio 0.75, {args.steps} timed steps after {args.warmup} warm-up steps\n")
    print("| row | batch | encoder | images/s | step ms | peak MB |\n|---|---|---|---|---|---|")
    for row_name in args.rows.split(","):
        row = ROWS[row_name]
        size, ch, batch, patch = row[3], row[4], row[5], row[2]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, ch, size, size, generator=g).to(device)      # content does not change the cost
        mask = MaskGenerator("random", 0.75)(batch, size // patch, size // patch, seed=0).to(device)
        models = {"sparse": build(row, True, device), "dense": build(row, False, device)}
        optim_cfg = OptimConfig(name="adamw", betas=(0.9, 0.95), weight_decay=0.05)      # MAE's AdamW
        opts = {k: build_optimizer(m, optim_cfg, device.type) for k, m in models.items()}
        for o in opts.values():
            for group in o.param_groups:
                group["lr"] = 1.5e-4
        times = {k: [] for k in models}
        peaks = {}
        for i in range(args.warmup + args.steps):
            for k, m in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = m({"views": [x], "masks": [mask]}, {})["loss"]
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[k] = torch.cuda.max_memory_allocated() / 2 ** 20
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        speed = {}
        for k in models:
            ms = 1000 * sorted(times[k])[len(times[k]) // 2]                    # median step
            speed[k] = batch / ms * 1000
            peak = f"{peaks[k]:.0f}" if k in peaks else "n/a (CPU)"
            print(f"| {row_name} | {batch} | {k} | {speed[k]:.1f} | {ms:.0f} | {peak} |")
        print(f"| {row_name} | | **sparse / dense** | **{speed['sparse'] / speed['dense']:.2f}x** | | |")


if __name__ == "__main__":
    main()
