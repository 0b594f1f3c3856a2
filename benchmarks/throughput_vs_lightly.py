"""SimCLR training throughput: selfsight vs a plain loop built from lightly's parts.

Same model (torchvision resnet18, ImageNet stem, 3-channel input, 2-layer BN projector 512-512-128),
same global batch (256), same data (Fashion-MNIST as RGB at 32 px), same augmentations (SimCLR:
random resized crop 0.08-1, flip, colour jitter 0.8 with p 0.8, grayscale 0.2, no blur), same
optimizer (SGD, momentum 0.9) and precision. Each configuration runs in its own process (so the
peak memory is its own), warms up, then times a fixed number of steps. Prints images/s, the share
of step time spent waiting for data, peak memory, and the ratio to lightly.

    pip install 'selfsight[bench]'     # lightly
    python benchmarks/throughput_vs_lightly.py --steps 30
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ROW = "ROW "


def peak_mb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rgb_fmnist():
    from selfsight.data import ArrayDataset, build_dataset
    ds = build_dataset("fashion-mnist")
    return ArrayDataset(ds.images.expand(-1, 3, -1, -1).contiguous(), ds.labels, name="fmnist-rgb")


def run_selfsight(args, extra: list[str]) -> dict:
    import torch
    from selfsight.config import load_config
    from selfsight.engine.trainer import Trainer
    over = ["method.name=simclr", "method.temperature=0.5", "method.proj_hidden_dim=512", "views.size=32",
            "views.blur_p=0", "backbone.name=resnet18", "backbone.small_stem=none", "optim.name=sgd", "optim.lr=0.06",
            "optim.base_batch=128", "optim.weight_decay=5e-4", f"data.batch_size={args.batch}",
            f"train.steps={args.warmup + args.steps}", "train.progress=false", "train.tensorboard=false",
            "train.checkpoint_every=0", f"train.log_every={args.warmup + args.steps}", f"train.precision={args.precision}"]
    cfg = load_config(overrides=over + extra)
    import tempfile
    tr = Trainer(cfg, tempfile.mkdtemp(prefix="bench_"), dataset=rgb_fmnist())
    state = {}
    real_step = tr.optimizer.step

    def timed_step(*a, **k):                       # start the clock after the warm-up steps
        out = real_step(*a, **k)
        if tr.step + 1 == args.warmup:
            state.update(t=time.perf_counter(), wait=tr.loader.wait)
        return out
    tr.optimizer.step = timed_step
    tr.fit()
    dt = time.perf_counter() - state["t"]
    return {"images_per_s": args.steps * args.batch / dt, "data_wait": (tr.loader.wait - state["wait"]) / dt,
            "peak_mb": peak_mb(tr.device.type)}


def run_lightly(args) -> dict:
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = rgb_fmnist()
    transform = SimCLRTransform(input_size=32, gaussian_blur=0.0, min_scale=0.08)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            img = Image.fromarray(data.images[i].permute(1, 2, 0).numpy())
            return transform(img), int(data.labels[i])
    loader = torch.utils.data.DataLoader(DS(), batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(512, 512, 128)).to(device)
    crit = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.06 * args.batch / 128, momentum=0.9, weight_decay=5e-4)
    amp = args.precision != "fp32"
    it = iter(loader)
    wait = 0.0
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        (x0, x1), _ = next(it)
        wait += time.perf_counter() - tw
        x0, x1 = x0.to(device), x1.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(x0), model(x1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    return {"images_per_s": args.steps * args.batch / dt, "data_wait": wait / dt, "peak_mb": peak_mb(device)}


CONFIGS = {
    "selfsight": lambda a: run_selfsight(a, []),
    "selfsight (no channels-last, per-sample v2 aug in workers)":
        lambda a: run_selfsight(a, ["backbone.channels_last=false", "data.device_augment=off", f"data.workers={a.workers}"]),
    "lightly plain loop": run_lightly,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for per-sample augmentation")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(ROW + json.dumps(CONFIGS[args.only](args)), flush=True)
        return
    rows = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--workers", str(args.workers), "--precision", args.precision]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith(ROW)]
        if not line:
            print(f"{name}: FAILED\n{out.stderr[-2000:]}")
            continue
        rows[name] = json.loads(line[-1][len(ROW):])
        print(f"{name}: {rows[name]}", flush=True)
    ref = rows.get("lightly plain loop", {}).get("images_per_s")
    print(f"\nSimCLR, resnet18, batch {args.batch}, Fashion-MNIST RGB 32 px, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print("| run | images/s | data wait | peak memory (MB) | vs lightly |\n|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else "n/a"
        print(f"| {name} | {r['images_per_s']:.0f} | {100 * r['data_wait']:.1f} % | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
