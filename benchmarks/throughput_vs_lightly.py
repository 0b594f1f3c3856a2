"""Training throughput: selfsight vs a plain loop built from lightly's parts (SimCLR, MoCo v2).

Same model (torchvision resnet18, ImageNet stem, 3-channel input), same global batch (256), same
data (Fashion-MNIST as RGB at 32 px), same optimizer (SGD, momentum 0.9) and precision.

* SimCLR: 2-layer BN projector 512-512-128, NT-Xent τ 0.5, SimCLR views (crop 0.08-1, flip,
  jitter 0.8 with p 0.8, grayscale 0.2, no blur); lightly: ``NTXentLoss`` + ``SimCLRTransform``.
* MoCo v2: MLP head 512-512-128 without BN, momentum encoder (m 0.99), a queue (memory bank) of
  4,096 keys, InfoNCE τ 0.2, asymmetric loss, MoCo v2 views without blur (crop 0.2-1, jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2); lightly: ``MoCoProjectionHead``,
  ``update_momentum``, ``NTXentLoss(memory_bank_size=(4096, 128))`` and ``MoCoV2Transform``, as
  lightly's MoCo example (no shuffle-BN). selfsight runs twice: as it trains by default
  (shuffle-BN with 8 BN groups) and with shuffle-BN off, the same work as lightly's loop.

Each configuration runs in its own process (so the peak memory is its own), warms up, then
times a fixed number of steps. Prints images/s, the share of step time spent waiting for data,
peak memory, and the ratio to lightly's loop for the same method.

    pip install 'selfsight[bench]'     # lightly
    python benchmarks/throughput_vs_lightly.py --steps 30 [--methods simclr,mocov2]
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


METHOD_OVERRIDES = {
    "simclr": ["method.name=simclr", "method.temperature=0.5", "method.proj_hidden_dim=512"],
    "mocov2": ["method.name=mocov2", "method.temperature=0.2", "method.queue_size=4096", "method.momentum=0.99",
               "method.head_hidden_dim=512"],
}


def run_selfsight(args, method: str, extra: list[str]) -> dict:
    from selfsight.config import load_config
    from selfsight.engine.trainer import Trainer
    over = METHOD_OVERRIDES[method] + [
            "views.size=32", "views.blur_p=0", "backbone.name=resnet18", "backbone.small_stem=none",
            "optim.name=sgd", "optim.lr=0.06",
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


def run_lightly(args, method: str) -> dict:
    import copy

    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform, SimCLRTransform
    from PIL import Image
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = rgb_fmnist()
    if method == "simclr":
        transform = SimCLRTransform(input_size=32, gaussian_blur=0.0, min_scale=0.08)
    else:
        transform = MoCoV2Transform(input_size=32, gaussian_blur=0.0)

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
    if method == "simclr":
        model = torch.nn.Sequential(backbone, SimCLRProjectionHead(512, 512, 128)).to(device)
        crit = NTXentLoss(temperature=0.5)
    else:
        model = torch.nn.Sequential(backbone, MoCoProjectionHead(512, 512, 128)).to(device)
        key_model = copy.deepcopy(model)
        deactivate_requires_grad(key_model)
        crit = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
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
            if method == "simclr":
                loss = crit(model(x0), model(x1))
            else:
                update_momentum(model, key_model, m=0.99)
                with torch.no_grad():
                    key = key_model(x1)
                loss = crit(model(x0), key)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    return {"images_per_s": args.steps * args.batch / dt, "data_wait": wait / dt, "peak_mb": peak_mb(device)}


CONFIGS = {     # name -> (method, runner)
    "SimCLR selfsight": ("simclr", lambda a: run_selfsight(a, "simclr", [])),
    "SimCLR selfsight (no channels-last, per-sample v2 aug in workers)": ("simclr", lambda a: run_selfsight(
        a, "simclr", ["backbone.channels_last=false", "data.device_augment=off", f"data.workers={a.workers}"])),
    "SimCLR lightly plain loop": ("simclr", lambda a: run_lightly(a, "simclr")),
    "MoCo v2 selfsight (shuffle-BN, 8 BN groups)": ("mocov2", lambda a: run_selfsight(a, "mocov2", [])),
    "MoCo v2 selfsight (no shuffle-BN, as lightly's loop)": ("mocov2", lambda a: run_selfsight(
        a, "mocov2", ["method.shuffle_bn=false", "method.bn_splits=1"])),
    "MoCo v2 lightly plain loop": ("mocov2", lambda a: run_lightly(a, "mocov2")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for per-sample augmentation")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--methods", default="simclr,mocov2", help="comma-separated: simclr, mocov2")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(ROW + json.dumps(CONFIGS[args.only][1](args)), flush=True)
        return
    rows = {}
    for name, (method, _) in CONFIGS.items():
        if method not in args.methods.split(","):
            continue
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--workers", str(args.workers), "--precision", args.precision]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith(ROW)]
        if not line:
            print(f"{name}: FAILED\n{out.stderr[-2000:]}")
            continue
        rows[name] = json.loads(line[-1][len(ROW):])
        print(f"{name}: {rows[name]}", flush=True)
    print(f"\nresnet18, batch {args.batch}, Fashion-MNIST RGB 32 px, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print("| run | images/s | data wait | peak memory (MB) | vs lightly |\n|---|---|---|---|---|")
    for name, r in rows.items():
        method = CONFIGS[name][0]
        ref = next((v["images_per_s"] for n, v in rows.items() if CONFIGS[n][0] == method and n.endswith("lightly plain loop")), None)
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else "n/a"
        print(f"| {name} | {r['images_per_s']:.0f} | {100 * r['data_wait']:.1f} % | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
