"""How step time and memory grow with batch size, image size, number of crops and mask ratio,
each varied alone around one small base, through selfsight's own ``Trainer``.

Axes (the base value in brackets; every other setting stays at the base):

* ``batch``: SimCLR, torchvision resnet18, 32 px, batch 32 / [64] / 128 / 256.
  Expected: linear in the batch.
* ``size``: the same SimCLR at [32] / 64 / 96 px, batch 64. Expected: quadratic in the side
  (a ConvNet's work is proportional to its pixels).
* ``crops``: DINO, resnet18, 2 global crops at 32 px + [0] / 2 / 4 / 8 local crops at 16 px,
  batch 64, a 512-512-64 head to 4,096 prototypes. Expected: the pixels the network processes,
  the student's forward + backward counted 3x (backward ~ 2x forward) and the teacher's forward
  on the 2 global crops 1x: (3·(2·32² + n·16²) + 2·32²) / (8·32²).
* ``mask``: MAE, ViT 6x192 with 4 px patches at 32 px (64 patches), a 2x128 decoder, batch 64,
  mask ratio 0.5 / [0.75] / 0.9. Expected: the encoder's visible tokens (32 / 16 / 6); the
  decoder always sees all 64 positions, so the whole step moves less than that.

Each row runs in its own process on Fashion-MNIST as RGB (in memory, augmented in batches on the
training device), warms up, then times steps; the wall step time is the median of the per-step
``images_per_s`` rows of the run's ``metrics.jsonl``, the CPU time the median per-step process CPU
time (all threads; less sensitive than wall time to other jobs on the same cores, not immune:
waiting threads that spin count). Memory: on CUDA the peak allocated during training; on the CPU
the process's peak RSS during training (``VmHWM``, reset before it) less its RSS before (which
already holds the data set, the libraries and the model). The FLOPs of one training step (forward
+ backward, ``FlopCounterMode``) give a third ratio: what the arithmetic alone predicts.

    python benchmarks/scaling.py [--axes batch,size,crops,mask] [--steps 3] [--warmup 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROW = "ROW "
SIMCLR = ["method.name=simclr", "method.temperature=0.5", "method.proj_hidden_dim=512", "backbone.name=resnet18",
          "backbone.small_stem=none", "optim.name=sgd", "optim.lr=0.06", "optim.base_batch=128", "views.blur_p=0"]
DINO = ["method.name=dino", "method.hidden_dim=512", "method.bottleneck_dim=64", "method.out_dim=4096",
        "backbone.name=resnet18", "backbone.small_stem=none", "backbone.drop_path=0", "optim.name=sgd",
        "optim.lr=0.03", "optim.base_batch=256", "optim.clip_grad=0", "optim.weight_decay_end=-1", "views.size=32",
        "views.local_size=16", "views.blur_p=0"]
MAE = ["method.name=mae", "method.head.decoder_dim=128", "method.head.decoder_depth=2",
       "method.head.decoder_heads=4", "backbone.name=vit_tiny", "backbone.depth=6", "backbone.patch_size=4",
       "views.size=32"]
BASE = {"batch": 64, "size": 32, "crops": 0, "mask": 0.75}
AXES = {   # axis: (values, label, overrides for a value)
    "batch": ([32, 64, 128, 256], "SimCLR resnet18 32 px, batch",
              lambda v: SIMCLR + ["views.size=32", f"data.batch_size={v}"]),
    "size": ([32, 64, 96], "SimCLR resnet18 batch 64, px",
             lambda v: SIMCLR + [f"views.size={v}", "data.batch_size=64"]),
    "crops": ([0, 2, 4, 8], "DINO resnet18 2x32 px + local 16 px crops",
              lambda v: DINO + [f"views.local_crops={v}", "data.batch_size=64"]),
    "mask": ([0.5, 0.75, 0.9], "MAE ViT 6x192 patch 4 32 px, mask ratio",
             lambda v: MAE + [f"method.mask.ratio={v}", "data.batch_size=64"]),
}


def expected(axis: str, value, base, row: dict, base_row: dict) -> float:
    """The ratio to the base that the simple rule predicts."""
    if axis == "batch":
        return value / base
    if axis == "size":
        return (value / base) ** 2
    if axis == "crops":
        def units(n):
            return 3 * (2 * 32 ** 2 + n * 16 ** 2) + 2 * 32 ** 2
        return units(value) / units(base)
    return row["visible_tokens"] / base_row["visible_tokens"]


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_one(args, overrides: list[str]) -> dict:
    import torch
    from gpu_throughput import step_flops

    from selfsight.data import ArrayDataset, build_dataset
    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    total = args.warmup + args.steps
    cfg = load_config(overrides=overrides + [
        f"train.steps={total}", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
        "train.checkpoint_every=0", f"train.precision={args.precision}"])
    fm = build_dataset("fashion-mnist")
    data = ArrayDataset(fm.images.expand(-1, 3, -1, -1).contiguous(), fm.labels, name="fmnist-rgb")
    run_dir = Path(tempfile.mkdtemp(prefix="scaling_"))
    tr = Trainer(cfg, run_dir, dataset=data)
    batch = next(iter(tr.loader.epoch(0, 0)))
    visible = None
    if batch.get("masks") and batch["masks"][0] is not None:
        visible = int((~batch["masks"][0][0]).sum())
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset_peak_rss()
        before = rss_mb("VmRSS")
    flops = step_flops(tr)                     # one forward + backward: counted in the peak like any step
    marks = []                                 # (step, process CPU seconds) at the start of every step
    schedule = tr.schedule

    def marked(step):
        marks.append((step, time.process_time()))
        return schedule(step)
    tr.schedule = marked
    tr.fit()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else rss_mb("VmHWM")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    times = [cfg.data.batch_size / r["images_per_s"] for r in rows if r["step"] > args.warmup]
    cpu = [b - a for (s, a), (_, b) in zip(marks, marks[1:]) if s >= args.warmup]
    return {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_mb": peak,
            "train_mb": max(peak - before, 0.0),
            "gflop": flops / 1e9, "visible_tokens": visible, "batch": cfg.data.batch_size,
            "device": str(tr.device), "precision": str(tr.amp_dtype or "fp32").replace("torch.", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axes", default=",".join(AXES), help=f"comma-separated: {', '.join(AXES)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="", help="cpu hides the GPUs (CUDA_VISIBLE_DEVICES=''); default: the trainer's")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(ROW + json.dumps(run_one(args, json.loads(args.only))), flush=True)
        return
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        ap.error(f"unknown axis {', '.join(unknown)}; choose from {', '.join(AXES)}")
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cache: dict = {}                      # the same overrides run once (the batch and size axes share their base)
    lines = []
    head = None
    for axis in axes:
        values, label, make = AXES[axis]
        results = {}
        for v in values:
            over = make(v)
            key = json.dumps(over)
            if key not in cache:
                cmd = [sys.executable, __file__, "--only", key, "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--precision", args.precision]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in out.stdout.splitlines() if x.startswith(ROW)]
                if not line:
                    print(f"{axis}={v}: FAILED\n{out.stderr[-2000:]}", flush=True)
                    continue
                cache[key] = json.loads(line[-1][len(ROW):])
            results[v] = cache[key]
            print(f"{axis}={v}: {results[v]}", flush=True)
        base = BASE[axis]
        if base not in results:
            continue
        b = results[base]
        head = head or (f"{b['device']}, precision {b['precision']}, {os.cpu_count()} CPU cores, "
                        f"median of {args.steps} timed steps after {args.warmup} warm-up")
        for v, r in results.items():
            lines.append(f"| {label} {v}{' (base)' if v == base else ''} | {1000 * r['step_s']:.0f} | "
                         f"{r['step_s'] / b['step_s']:.2f}x | {r['cpu_s'] / b['cpu_s']:.2f}x | "
                         f"{expected(axis, v, base, r, b):.2f}x | "
                         f"{r['gflop'] / b['gflop']:.2f}x | {r['train_mb']:.0f} | "
                         f"{r['train_mb'] / max(b['train_mb'], 1e-9):.2f}x |")
    print(f"\n{head}\n")
    print("| setting | step ms (wall) | wall vs base | CPU time vs base | expected | FLOPs vs base | "
          "training memory (MB) | memory vs base |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
