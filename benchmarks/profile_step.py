"""Where one training step of a ``gpu_throughput.py`` recipe spends its time: the loader, the
forward, the backward and the rest (clipping, optimizer, EMA), then a ``torch.profiler`` table of
the ops that take the most device time, and how busy the device was (kernel time / wall time; far
below 100 % means the step is bound by the host: launches, Python, small kernels).

    python benchmarks/profile_step.py --recipe dino_vits16 --data /tmp/jpegs --set data.cache=true
    python benchmarks/profile_step.py --tiny --recipe mae_vitb16       # CPU smoke check
    python benchmarks/profile_step.py --recipe mae_vitb16 --compile    # + the step under train.compile

``--compile`` then compiles the networks as ``train.compile=true`` does, times the first (compiling)
step and the compiled step, and prints eager against compiled; a failure prints the whole error.

Every step runs on one batch drawn once, so the loader is timed apart (``loader ms/batch``,
the device part of the augmentation included) and the step numbers are the model's alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_throughput import RECIPES, make_jpeg_folder  # noqa: E402


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int, device) -> float:
    """ms per ``step()`` over ``steps`` calls after ``warmup`` untimed ones, the device synchronised."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="dino_vits16", choices=list(RECIPES))
    ap.add_argument("--data", default="", help="a folder of images (default: 512 JPEGs made from skimage photos)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the recipe's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 5 warm-up steps)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    ap.add_argument("--tiny", action="store_true", help="tiny models and images: a CPU smoke check")
    ap.add_argument("--compile", action="store_true", help="also time the step compiled (train.compile)")
    args = ap.parse_args()
    r = RECIPES[args.recipe]
    data = args.data or make_jpeg_folder(tempfile.mkdtemp(prefix="profile_jpegs_"), 64 if args.tiny else 512,
                                         *((64, 128) if args.tiny else (256, 480)))
    batch_size = args.batch or (16 if args.tiny else r.batch)
    over = (r.tiny if args.tiny else r.overrides) + [
        f"data.train={data}", f"data.batch_size={batch_size}", "views.preset=imagenet", "train.steps=1000",
        "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=0"] + args.set
    tr = Trainer(load_config(overrides=over), Path(tempfile.mkdtemp(prefix="profile_run_")))
    dev = tr.device
    tr.model.train()

    it = tr.loader.epoch(0, 0)
    batch = next(it)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(3):
        next(it)
    _sync(dev)
    loader_ms = (time.perf_counter() - t0) / 3 * 1000
    if tr.channels_last:
        batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    sched = tr.schedule(0)
    window = tr.log.window()

    def step() -> None:
        tr._step(batch, sched, window)
        tr.step += 1

    step_ms = time_steps(step, 5, args.steps, dev)

    # phases, each ended by a synchronisation (so their sum is a little above the pipelined step)
    phases = {"forward": 0.0, "backward": 0.0, "rest": 0.0}
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=tr.amp_dtype or torch.float32, enabled=tr.amp_dtype is not None):
            out = tr.ddp(batch, sched)
        _sync(dev)
        t1 = time.perf_counter()
        tr.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        _sync(dev)
        t2 = time.perf_counter()
        tr.optimizer.zero_grad(set_to_none=True)
        step()                                  # a whole step again: the rest = step - forward - backward
        _sync(dev)
        t3 = time.perf_counter()
        phases["forward"] += (t1 - t0) / 3
        phases["backward"] += (t2 - t1) / 3
        phases["rest"] += ((t3 - t2) - (t1 - t0) - (t2 - t1)) / 3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(dev)
    wall = (time.perf_counter() - t0) / 3
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / 3 if dev.type == "cuda" else float("nan")

    name = r.tiny_label if args.tiny else r.label
    print(f"\n{name}, batch {batch_size}, {tr.device} ({torch.cuda.get_device_name() if dev.type == 'cuda' else ''}), "
          f"precision {tr.amp_dtype or 'fp32'}, overrides {' '.join(args.set) or '-'}")
    print(f"| loader ms/batch | step ms | forward ms | backward ms | rest ms | device busy |")
    print(f"|---|---|---|---|---|---|")
    busy = f"{100 * kernel_s / wall:.0f} %" if kernel_s == kernel_s else "n/a"
    print(f"| {loader_ms:.1f} | {step_ms:.1f} | {1000 * phases['forward']:.1f} | {1000 * phases['backward']:.1f} | "
          f"{1000 * phases['rest']:.1f} | {busy} |")
    if args.rows:
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.compile:
        compiled_step(tr, step, step_ms, args.steps, dev)


def compiled_step(tr, step, eager_ms: float, steps: int, dev) -> None:
    """Compile the trainer's networks in place (``train.compile``), then time the compiling step and
    the compiled step against the eager one; a failure prints its whole traceback."""
    import traceback

    from selfsight.engine.compile import compile_model
    names = compile_model(tr.model)
    _sync(dev)
    t0 = time.perf_counter()
    try:
        step()
        step()                                  # the first backward compiles in the second step's graph too
        _sync(dev)
    except Exception:
        print(f"\ncompile FAILED ({', '.join(names)}):")
        traceback.print_exc(file=sys.stdout)
        return
    first_s = time.perf_counter() - t0
    ms = time_steps(step, 3, steps, dev)
    print(f"\ncompiled ({', '.join(names)}): first two steps {first_s:.1f} s, step {ms:.1f} ms against "
          f"{eager_ms:.1f} ms eager: {eager_ms / ms:.2f}x")


if __name__ == "__main__":
    main()
