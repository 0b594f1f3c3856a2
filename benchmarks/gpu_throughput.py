"""GPU training throughput of three reference recipes through selfsight's own ``Trainer``, data
loading included, with model-FLOPs utilisation (MFU).

Recipes (each in its own process, so its peak memory is its own):

* ``simclr_r50``: SimCLR, torchvision ResNet-50, 2 views at 224 px (the ``imagenet`` views:
  crop, flip, jitter, grayscale, blur), LARS, channels-last (the default for ResNets), batch 256.
* ``dino_vits16``: DINO, ViT-S/16, 2 global crops at 224 px + 10 local crops at 96 px, its ViT
  recipe (AdamW, per-parameter clipping, 65,536 prototypes, EMA teacher), batch 128.
* ``mae_vitb16``: MAE, ViT-B/16 at 224 px, 75 % random masking (the encoder sees 49 of 196
  patches), its 8×512 decoder, norm-pix loss, AdamW, batch 256.

Data: a folder of real JPEGs, made once from scikit-image's bundled photos (random crops,
aspect ratios, flips and sizes of 256-480 px, as ImageNet's) in a temporary folder
(``--files``, default 5,000), or ``--data FOLDER``. Images are decoded and augmented per sample
in ``--workers`` DataLoader workers, as the trainer does for any folder.

What is printed, per recipe, over the timed steps after the warm-up (read from the run's own
``metrics.jsonl``: ``images_per_s`` and ``data_wait``): images/s, step time, the share of step
time spent waiting for the loader, peak GPU memory (``torch.cuda.max_memory_allocated``), the
FLOPs of one training step (forward + backward of the method on one real batch, counted once with
``torch.utils.flop_counter.FlopCounterMode``; the optimizer step is not counted) and
MFU = FLOPs/step × steps/s / peak FLOP/s. The peak comes from a small table of dense bf16 tensor
FLOP/s by GPU name (H100 SXM / H200 989 TFLOP/s, A100 312, ...) or ``--peak-tflops``. Targets
printed beside the results: MFU >= 35 % for the ViT recipes, >= 25 % for ResNet-50, data wait < 5 %.

    python benchmarks/gpu_throughput.py --out bench_gpu            # ~4 minutes on one H100 (estimate)
    python benchmarks/gpu_throughput.py --compile --out bench_gpu  # with train.compile=true
    python benchmarks/gpu_throughput.py --tiny                     # CPU smoke check: tiny models, 3 steps
    python benchmarks/gpu_throughput.py --make /tmp/jpegs --recipes simclr_r50   # keep the JPEGs, then
    python benchmarks/gpu_throughput.py --data /tmp/jpegs --set data.cache=true  # the decoded uint8 cache

``--syncs`` (CUDA): the timed steps run under ``torch.cuda.set_sync_debug_mode("warn")``, and each
row counts the operations that made the host wait for the GPU (a blocking upload, a read back),
per step, apart from the bookkeeping's own reads (metric rows every ``train.log_every`` steps, the
final checkpoint and pictures), with the code lines that caused them. Zero means the host can
prepare the next batch while the GPU computes.

``--out DIR`` writes ``DIR/gpu_throughput.json`` and ``DIR/gpu_throughput.md``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings as pywarnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

ROW = "ROW "
WAIT_TARGET = 0.05
# dense bf16 tensor-core FLOP/s (TFLOP/s) by a piece of the GPU's name; first match wins
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
               ("RTX 4090", 165.0), ("V100", 125.0)]


@dataclass
class Recipe:
    label: str
    family: str                                  # vit | convnet: which MFU target applies
    batch: int
    overrides: list[str]
    tiny: list[str] = field(default_factory=list)   # replaces the model and views for --tiny
    tiny_label: str = ""


RECIPES = {
    "simclr_r50": Recipe("SimCLR ResNet-50, 2x224", "convnet", 256,
                         ["method.name=simclr", "backbone.name=resnet50", "views.size=224"],
                         ["method.name=simclr", "backbone.name=resnet10", "backbone.width=8", "views.size=64",
                          "method.proj_hidden_dim=64", "method.proj_out_dim=32"], "SimCLR resnet10-w8, 2x64 (tiny)"),
    "dino_vits16": Recipe("DINO ViT-S/16, 2x224 + 10x96", "vit", 128,
                          ["method.name=dino", "backbone.name=vit_small", "backbone.patch_size=16", "views.size=224",
                           "views.local_crops=10", "views.local_size=96"],
                          ["method.name=dino", "backbone.name=vit_tiny", "backbone.depth=2", "backbone.patch_size=16",
                           "views.size=64", "views.local_crops=2", "views.local_size=32", "method.out_dim=1024",
                           "method.hidden_dim=128", "method.bottleneck_dim=64"],
                          "DINO ViT 2x192/16, 2x64 + 2x32 (tiny)"),
    "mae_vitb16": Recipe("MAE ViT-B/16, mask 0.75", "vit", 256,
                         ["method.name=mae", "backbone.name=vit_base", "backbone.patch_size=16", "views.size=224",
                          "method.mask.ratio=0.75"],
                         ["method.name=mae", "backbone.name=vit_tiny", "backbone.depth=2", "backbone.patch_size=16",
                          "views.size=64", "method.head.decoder_dim=64", "method.head.decoder_depth=1",
                          "method.head.decoder_heads=2"], "MAE ViT 2x192/16, 64 px, mask 0.75 (tiny)"),
}
MFU_TARGET = {"vit": 0.35, "convnet": 0.25}


# ---------------------------------------------------------------------------------------- data

def _photos() -> list:
    """scikit-image's bundled photos (no download), as H×W×3 uint8."""
    import numpy as np
    from skimage import data
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "colorwheel", "camera", "horse", "moon", "coins", "clock", "brick", "grass", "gravel"):
        img = np.asarray(getattr(data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return out


def _write_jpegs(job: tuple) -> None:
    import numpy as np
    from PIL import Image
    root, start, stop, lo, hi = job
    photos = _photos()
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        area = rng.uniform(0.2, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, int(round((area / aspect) ** 0.5))), min(w, int(round((area * aspect) ** 0.5)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[y:y + ch, x:x + cw])
        short = rng.integers(lo, hi + 1)
        scale = short / min(ch, cw)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(os.path.join(root, f"{i // 1000:03d}", f"{i:06d}.jpg"), quality=90)


def make_jpeg_folder(root: str, n: int, lo: int = 256, hi: int = 480, procs: int = 0) -> str:
    """``n`` JPEGs (short side ``lo``-``hi`` px) in ``root/000/000000.jpg``...; returns ``root``."""
    from multiprocessing import get_context
    for k in range((n + 999) // 1000):
        os.makedirs(os.path.join(root, f"{k:03d}"), exist_ok=True)
    procs = procs or max(1, min(16, os.cpu_count() or 1))
    chunk = max(1, (n + procs - 1) // procs)
    jobs = [(root, s, min(n, s + chunk), lo, hi) for s in range(0, n, chunk)]
    if len(jobs) == 1:
        _write_jpegs(jobs[0])
        return root
    with get_context("spawn").Pool(len(jobs)) as pool:
        pool.map(_write_jpegs, jobs)
    return root


# ---------------------------------------------------------------------------------- one recipe

class _Warnings(logging.Handler):
    """The selfsight warnings of a run (e.g. a compile that failed and fell back to eager)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def peak_tflops(device_name: str, given: float) -> float | None:
    if given > 0:
        return given
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def step_flops(tr) -> float:
    """FLOPs of one training step (forward + backward) of ``tr``'s method on one real batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    batch = next(iter(tr.loader.epoch(0, 0)))
    if tr.channels_last:
        batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    # counted eagerly: the compiled networks compile in the run's first step, not under the counter
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with eager, FlopCounterMode(display=False) as counter:
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32, enabled=tr.amp_dtype is not None):
            out = tr.model(batch, tr.schedule(0))
        out["loss"].backward()
    tr.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def compiled_graphs() -> int:
    """Graphs torch.compile made in this process so far (0: a compiled run that ran eagerly)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def timed_window(metrics: Path, warmup: int, batch: int) -> dict:
    """Steps, seconds and data-wait seconds of the metric rows after the warm-up steps."""
    steps = seconds = wait = aug = 0.0
    prev = 0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        n = row["step"] - prev
        prev = row["step"]
        if row["step"] <= warmup or n <= 0:
            continue
        span = n * batch / row["images_per_s"]
        steps, seconds, wait = steps + n, seconds + span, wait + row["data_wait"] * span
        aug += row.get("augment_share", 0.0) * span
    return {"steps": steps, "seconds": seconds, "wait": wait, "aug": aug}


class _HostSyncs:
    """Counts the host-device synchronisations of a ``Trainer`` from the step ``start`` on, under
    ``torch.cuda.set_sync_debug_mode("warn")``; those of its bookkeeping (the metric rows read the
    loss on purpose, the final checkpoint and pictures copy to the host) are counted apart."""

    def __init__(self, tr, start: int):
        self.in_log, self.on, self.sites, self.log_syncs = False, False, {}, 0
        for name in ("_read_counters", "save", "write_pictures"):
            setattr(tr, name, self._marking(getattr(tr, name)))
        tr.log.flush = self._marking(tr.log.flush)          # the metric rows read the loss on purpose
        real_step = tr._step

        def step(batch, sched, window):
            if tr.step == start and not self.on:
                import torch
                pywarnings.simplefilter("always")
                pywarnings.showwarning = self._seen
                torch.cuda.set_sync_debug_mode("warn")
                self.on = True
            return real_step(batch, sched, window)
        tr._step = step

    def _marking(self, fn):
        def marked(*a, **k):
            self.in_log = True
            try:
                return fn(*a, **k)
            finally:
                self.in_log = False
        return marked

    def _seen(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        if self.in_log:
            self.log_syncs += 1
        else:
            where = f"{Path(filename).name}:{lineno}"
            self.sites[where] = self.sites.get(where, 0) + 1

    def row(self, steps: int) -> dict:
        top = sorted(self.sites.items(), key=lambda kv: -kv[1])[:5]
        return {"host_syncs_per_step": sum(self.sites.values()) / max(steps, 1), "host_sync_sites": top,
                "log_row_syncs": self.log_syncs}


def run_recipe(args, name: str) -> dict:
    import torch

    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    r = RECIPES[name]
    batch = args.batch or (16 if args.tiny else r.batch)
    over = (r.tiny if args.tiny else r.overrides) + [
        f"data.train={args.data}", f"data.batch_size={batch}", f"data.workers={args.workers}",
        "views.preset=imagenet", f"train.steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
        "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=0",
        f"train.precision={args.precision}"]
    if args.compile:
        over.append("train.compile=true")
    cfg = load_config(overrides=over + list(args.set))
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu_bench_{name}_"))
    warnings = _Warnings()
    logging.getLogger("selfsight").addHandler(warnings)
    try:
        tr = Trainer(cfg, run_dir)
        flops = step_flops(tr)
        cuda = tr.device.type == "cuda"
        syncs = _HostSyncs(tr, args.warmup) if args.syncs and cuda else None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tr.fit()
        if syncs is not None:
            torch.cuda.set_sync_debug_mode(0)
        compiled = bool(tr.compiled)            # emptied when compiling failed and the run went on eagerly
        graphs = compiled_graphs()
        w = timed_window(run_dir / "metrics.jsonl", args.warmup, batch)
        if cuda:
            peak_gb = torch.cuda.max_memory_allocated() / 2 ** 30
            device = torch.cuda.get_device_name()
        else:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            device = f"cpu ({torch.get_num_threads()} threads)"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    steps_per_s = w["steps"] / w["seconds"]
    peak = peak_tflops(device, args.peak_tflops) if cuda or args.peak_tflops > 0 else None
    return {"recipe": name, "label": r.tiny_label if args.tiny else r.label, "family": r.family, "device": device,
            "batch": batch,
            "precision": str(tr.amp_dtype or "fp32").replace("torch.", ""),
            "compile": bool(args.compile) and compiled and graphs > 0, "compiled_graphs": graphs,
            "compile_error": next((m for m in warnings.messages if "train.compile failed" in m),
                                  "no warning logged")
            if args.compile and not compiled else "no graph was compiled" if args.compile and not graphs else None,
            "timed_steps": int(w["steps"]),
            "images_per_s": steps_per_s * batch, "step_ms": 1000 / steps_per_s, "data_wait": w["wait"] / w["seconds"],
            "augment_share": w["aug"] / w["seconds"],
            "peak_mem_gb": peak_gb, "peak_mem_kind": "GPU allocated" if cuda else "process RSS",
            "gflop_per_step": flops / 1e9, "peak_tflops": peak,
            "mfu": flops * steps_per_s / (peak * 1e12) if peak else None,
            **(syncs.row(args.steps) if syncs is not None else {})}


# -------------------------------------------------------------------------------------- report

def markdown(rows: list[dict], head: str) -> str:
    lines = [head, "", "| recipe | batch | images/s | step ms | data wait | device half of the data | peak memory (GB) "
             "| GFLOP/step | MFU | targets (MFU, data wait < 5 %) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | | FAILED: {r['error']} | | | | | | | |")
            continue
        label = r["label"] + (f" (compile FAILED, eager: {r['compile_error']})" if r.get("compile_error") else "")
        target = MFU_TARGET[r["family"]]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no peak: --peak-tflops)"
        ok_mfu = "n/a" if r["mfu"] is None else ("met" if r["mfu"] >= target else "missed")
        ok_wait = "met" if r["data_wait"] < WAIT_TARGET else "missed"
        lines.append(f"| {label} | {r['batch']} | {r['images_per_s']:.0f} | {r['step_ms']:.0f} | "
                     f"{100 * r['data_wait']:.1f} % | {100 * r.get('augment_share', 0.0):.1f} % | {r['peak_mem_gb']:.1f} | {r['gflop_per_step']:.4g} | {mfu} | "
                     f">= {100 * target:.0f} %: {ok_mfu}; wait: {ok_wait} |")
    for r in rows:
        if "host_syncs_per_step" in r:
            sites = ", ".join(f"{where} ({n})" for where, n in r["host_sync_sites"]) or "none"
            lines.append(f"\n{r['label']}: {r['host_syncs_per_step']:.2f} host syncs per step outside the bookkeeping "
                         f"(sites: {sites}); {r['log_row_syncs']} in writing metric rows, checkpoint and pictures")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    ap.add_argument("--data", default="", help="a folder of images (default: JPEGs made from skimage photos)")
    ap.add_argument("--make", default="", metavar="DIR",
                    help="make the JPEGs in DIR and keep them (reuse with --data DIR in a later command)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every recipe, e.g. --set data.cache=true (repeatable)")
    ap.add_argument("--files", type=int, default=0, help="JPEGs to make (default 5000; --tiny 64)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 30; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps, not timed (default 10; --tiny 1)")
    ap.add_argument("--batch", type=int, default=0, help="global batch for every recipe (default: the recipe's)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: CPU cores - 2; --tiny 1)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPUs")
    ap.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile)")
    ap.add_argument("--syncs", action="store_true", help="count host-device synchronisations per step (CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s of the device (default: by GPU name)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and images, 1+2 steps: a CPU smoke check")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per recipe before it is stopped")
    ap.add_argument("--out", default="", help="folder for gpu_throughput.json and gpu_throughput.md")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--log-every", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.tiny else 30)
    args.warmup = args.warmup or (1 if args.tiny else 10)
    args.workers = args.workers if args.workers >= 0 else (1 if args.tiny else max(2, (os.cpu_count() or 4) - 2))
    if args.only:
        print(ROW + json.dumps(run_recipe(args, args.only)), flush=True)
        return
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    tmp = None
    data = args.data
    if not data and importlib.util.find_spec("skimage") is None:
        ap.error("the JPEGs are made from scikit-image's photos: pip install scikit-image, or pass --data FOLDER")
    if data and not os.path.isdir(data):
        ap.error(f"--data {data}: no such folder")
    if not data:
        if args.make:
            os.makedirs(args.make, exist_ok=True)
        data = args.make or tempfile.mkdtemp(prefix="gpu_bench_jpegs_")
        tmp = None if args.make else data
        n = args.files or (64 if args.tiny else 5000)
        t0 = time.perf_counter()
        make_jpeg_folder(data, n, *((64, 128) if args.tiny else (256, 480)))
        print(f"made {n} JPEGs from skimage photos in {data} ({time.perf_counter() - t0:.1f} s)", flush=True)
    # a step budget that is a multiple of the log interval: the rows after the warm-up are the timed steps
    log_every = args.log_every or (1 if args.tiny else args.warmup)
    if args.warmup % log_every or args.steps % log_every:
        log_every = 1
    env = {**os.environ, "SELFSIGHT_CACHE": os.path.join(tmp or tempfile.gettempdir(), ".selfsight-cache")}
    rows = []
    try:
        for name in names:
            cmd = [sys.executable, __file__, "--only", name, "--data", data, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--workers", str(args.workers),
                   "--precision", args.precision, "--peak-tflops", str(args.peak_tflops),
                   "--log-every", str(log_every)] + [f"--set={o}" for o in args.set] \
                + (["--compile"] if args.compile else []) \
                + (["--syncs"] if args.syncs else []) \
                + (["--tiny"] if args.tiny else [])
            t0 = time.perf_counter()
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                line = [x for x in out.stdout.splitlines() if x.startswith(ROW)]
                err = None if line else (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
                if err:
                    print(f"{name}: FAILED\n{out.stderr[-3000:]}", flush=True)
            except subprocess.TimeoutExpired:
                line, err = [], f"stopped after {args.timeout} s"
                print(f"{name}: {err}", flush=True)
            row = json.loads(line[-1][len(ROW):]) if line else {"recipe": name, "label": RECIPES[name].label,
                                                                "error": err}
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            if line:
                print(f"{name}: {json.dumps(row)}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = [r for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    compiled = "on" if ok and ok[0]["compile"] else "off"
    head = (f"{device}, precision {ok[0]['precision'] if ok else '?'}, compile {compiled}, "
            f"{args.workers} loader workers, {'tiny models, ' if args.tiny else ''}{args.steps} timed steps after "
            f"{args.warmup} warm-up, data {args.data or 'JPEGs made from skimage photos'}"
            + (f", overrides {' '.join(args.set)}" if args.set else ""))
    table = markdown(rows, head)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_throughput.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
        (out / "gpu_throughput.md").write_text(table + "\n")
        print(f"wrote {out / 'gpu_throughput.json'} and {out / 'gpu_throughput.md'}")


if __name__ == "__main__":
    main()
