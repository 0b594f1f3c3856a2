"""The one training loop: backward, clipping, optimizer step, every schedule, AMP, DDP,
checkpoints, logs and progress. Methods only compute ``{"loss": ...}`` (house plan)."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from selfsight import __version__
from selfsight.augment import resolve_recipe
from selfsight.augment.views import auto_views
from selfsight.backbones import build_backbone, wrap
from selfsight.backbones.factory import resolve_stem
from selfsight.config import RunConfig, save_config, to_dict
from selfsight.data import build_dataset, native_size
from selfsight.data.arraycache import maybe_cache
from selfsight.data.loader import ViewLoader
from selfsight.engine.monitor import collapse_warning, embedding_stats
from selfsight.engine.checkpoint import rng_state, set_rng_state
from selfsight.engine.compile import compile_model, toolchain_check, uncompile_model
from selfsight.engine.optim import build_optimizer, clip_gradients, gradients_finite, step_unless_nonfinite
from selfsight.schedules import cosine, scaled_lr
from selfsight.engine.sharding import OPTIMIZER_FORMAT, full_state, gathered, load_full_state, shard_model
from selfsight.eval.online_probe import build_online_probe
from selfsight.methods import build_method, hooks_of
from selfsight.files import FORMAT_VERSION, atomic_save, load_model_state, safe_load
from selfsight.nn.distributed import all_ranks, any_rank_true, is_main, rank, world_size
from selfsight.nn.sync_bn import convert_sync_batchnorm
from selfsight.runs import CHECKPOINT, check_compatible, preprocess_meta

log = logging.getLogger("selfsight")
STOP_SYNC_EVERY = 10        # DDP: steps between the all_reduce that agrees on a time or signal stop


class TrainingError(RuntimeError):
    pass


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; else the autocast dtype. ``auto``: bf16 where the device runs it natively."""
    if choice == "fp32":
        return None
    if choice not in ("auto", "bf16"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {choice!r}")
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if choice == "bf16" and not ok:
        log.warning("bf16 requested but %s has no native bf16: it will be slow", device)
    return torch.bfloat16 if (ok or choice == "bf16") else None


def setup_distributed() -> torch.device:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def describe_setup(cfg: RunConfig, recipe, native: int, found: str, custom_backbone: bool = False) -> str:
    """The start-up line that says which view size, preset and backbone stem a run takes, and why
    (``auto`` choices are made from the images' typical size ``native``, ``data.native_size``)."""
    v, b = cfg.views, cfg.backbone
    preset = auto_views(native)[0] if v.preset == "auto" else v.preset
    why = [f"views.preset={v.preset}"] + ([f"views.size={v.size}"] if v.size else [])
    net = "a custom backbone" if custom_backbone else b.name
    if not custom_backbone and b.name.startswith("resnet"):
        stem = resolve_stem(b.small_stem, recipe.size)
        net += f" with the {'ImageNet' if stem == 'none' else stem} stem"
        why.append(f"backbone.small_stem={b.small_stem}")
    elif not custom_backbone and b.name.startswith("vit"):
        net += f" with {b.patch_size} px patches ({recipe.size // b.patch_size}x{recipe.size // b.patch_size} tokens)"
        if recipe.size // b.patch_size < 4:
            log.warning("%s px views in %s px patches give only %dx%d tokens: set backbone.patch_size=4 (as the "
                        "bundled *_fashion_mnist ViT recipes) or larger views.size", recipe.size, b.patch_size,
                        recipe.size // b.patch_size, recipe.size // b.patch_size)
    return f"views: preset {preset} at {recipe.size} px, {net} ({', '.join(why)}; the data: {found})"


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, dataset=None,
                 backbone: nn.Module | None = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        t = cfg.train
        if not (t.epochs or t.steps or t.minutes):
            raise ValueError("give a budget: train.epochs, train.steps or train.minutes (--epochs/--steps/--minutes)")
        self.device = setup_distributed()
        self.rank, self.world = rank(), world_size()
        if t.threads:
            torch.set_num_threads(t.threads)
        elif self.world > 1 and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        torch.manual_seed(t.seed + self.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.dataset = dataset if dataset is not None else \
            build_dataset(cfg.data.train, cfg.data.root, cfg.data.download, cfg.data.shuffle_buffer)
        channels = getattr(self.dataset, "channels", 3)
        native, found = native_size(self.dataset)
        self.recipe = resolve_recipe(cfg.views, native, channels)
        self.channels = channels
        if self.rank == 0:
            log.info("%s", describe_setup(cfg, self.recipe, native, found, custom_backbone=backbone is not None))
        if dataset is None:         # data.cache: a folder becomes a memory-mapped uint8 array (decoded once)
            self.dataset = maybe_cache(self.dataset, cfg.data, self.recipe, channels, progress=t.progress)
        self.loader = ViewLoader(self.dataset, self.recipe, cfg.data.batch_size, self.device, self.rank, self.world,
                                 t.seed, cfg.data.workers, cfg.data.device_augment, cfg.data.decode,
                                 cfg.data.prefetch)
        self.model = build_method(cfg, channels, self.recipe.size, backbone).to(self.device)
        self.hooks = hooks_of(self.model)               # every call into the method goes through these
        if self.hooks.make_masker is not None:          # masked image modeling: masks drawn with each batch
            self.loader.masker = self.hooks.make_masker()
        self.channels_last = cfg.backbone.channels_last and backbone is None and cfg.backbone.name.startswith("resnet")
        if self.channels_last:      # oneDNN (CPU) and cuDNN both run NHWC convolutions faster
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = pick_precision(t.precision, self.device)
        if self.world > 1 and cfg.backbone.sync_bn:      # global BN before the optimizer sees the parameters
            self.model = convert_sync_batchnorm(self.model, self.device.type)
        self.fsdp = t.fsdp and self.world > 1
        if t.fsdp and self.world == 1:
            log.info("train.fsdp: one process, nothing to shard")
        if self.fsdp:                 # before the optimizer: it must see the sharded parameters
            shard_model(self.model, self.device, self.amp_dtype)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type, sharded=self.fsdp,
                                         fixed_lr=self.hooks.fixed_lr())
        self.compiled: list[str] = []       # train.compile: the networks compiled (tried in the first step)
        if t.compile:
            try:
                self.compiled = compile_model(self.model)
            except Exception as e:          # e.g. torch.compile unsupported on this Python
                self._compile_failed(e)
            if self.world > 1:
                self._agree_on_compile()
        # eval.online_probe: a linear classifier on detached features, outside the model and its optimizer
        self.probe = build_online_probe(cfg.eval, self.model, self.dataset, self.device, log)
        self.ddp = self.model
        if self.world > 1 and not self.fsdp:
            # buffers are not broadcast from rank 0 each step: a MoCo queue is identical on every rank
            # already (gathered keys) and per-process BN statistics are each process's own on purpose
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        spe = self.loader.steps_per_epoch
        self.steps_per_epoch = spe
        self.lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.base_batch, cfg.optim.lr_scaling)
        self.total_steps = self._planned_steps()
        self.step = 0
        self.elapsed = 0.0            # training seconds over all sessions (for the minutes budget)
        self._fixed_steps = bool(self._planned_steps())      # a step budget every rank knows in advance
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0      # non-finite steps skipped in this session
        # the same three counted on the device (no host read per step), read at log and checkpoint steps
        self._bad = {k: torch.zeros((), dtype=torch.long, device=self.device) for k in ("run", "worst", "total")}
        self._saved_step = None       # step of the last checkpoint written or resumed from
        self.collapse_warnings = 0
        self._stop_signal = None
        self.writer = None
        self._resumed_at = 0          # the step this session started from
        self._remove_run_dir = False  # set when a new run fails before its first step
        self._t_step1 = self._s_step1 = None    # elapsed and step after this session's first step (throughput)

    # ---- budget and schedules -------------------------------------------------------------
    def _planned_steps(self) -> int:
        t, spe = self.cfg.train, self.steps_per_epoch
        limits = [int(x) for x in (t.steps, math.ceil(t.epochs * spe) if t.epochs else 0) if x]
        if t.schedule_epochs:
            limits.append(int(t.schedule_epochs * spe))
        return min(limits) if limits else 0     # 0 = unknown until the throughput is measured (minutes only)

    def warmup_steps(self) -> int:
        o = self.cfg.optim
        total = self.total_steps or 10 * self.steps_per_epoch
        return int(o.warmup_epochs * self.steps_per_epoch) if o.warmup_epochs else int(o.warmup_fraction * total)

    def schedule(self, step: int) -> dict:
        o = self.cfg.optim
        # a time budget's length is known after 10 steps; until then assume 10 epochs
        total = max(self.total_steps or 10 * self.steps_per_epoch, step + 1)
        lr = cosine(step, total, self.lr, o.min_lr, self.warmup_steps())
        wd_end = o.weight_decay if o.weight_decay_end < 0 else o.weight_decay_end
        wd = cosine(step, total, o.weight_decay, wd_end)
        sched = {"step": step, "total_steps": total, "epoch": step / self.steps_per_epoch,
                 "progress": step / total, "lr": lr, "weight_decay": wd}
        # values a method declares, e.g. {"momentum": (0.996, 1.0)}: cosine from start to end per step
        for name, (start, end) in self.hooks.scheduled().items():
            sched[name] = cosine(step, total, start, end)
        return sched

    def _apply_schedule(self, sched: dict) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr if g.get("fixed_lr") else sched["lr"]       # fixed: e.g. SimSiam's predictor
            if g.get("apply_wd", True):
                g["weight_decay"] = sched["weight_decay"]

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self, full: tuple[dict, dict] | None = None) -> dict:
        """The checkpoint. ``full``: the (model, optimizer) states of a sharded model, gathered by
        ``sharding.full_state`` (the optimizer's keyed by parameter names)."""
        probe = {"online_probe": self.probe.state_dict_full()} if self.probe is not None else {}
        model, optimizer = full if full is not None else (self.model.state_dict(), self.optimizer.state_dict())
        fmt = {"optimizer_format": OPTIMIZER_FORMAT} if full is not None else {}
        return {**probe, **fmt, "format_version": FORMAT_VERSION, "model": model,
                "optimizer": optimizer, "step": self.step, "total_steps": self.total_steps,
                "elapsed": self.elapsed, "rng": rng_state(), "loader": self.loader.state_dict(),
                "config": to_dict(self.cfg),
                "meta": {"method": self.cfg.method.name, "backbone": self.cfg.backbone.name,
                         "preprocess": preprocess_meta(self.recipe, self.channels), "selfsight": __version__,
                         "world_size": self.world}}

    def save(self) -> None:
        """Write the checkpoint atomically (main process). A failed write (disk full, unwritable
        folder) leaves the previous checkpoint as it was and stops every process with one line."""
        error, per_rank = None, None
        if self.world > 1:          # each process's own RNG and loader streams, so a resumed DDP run continues exactly
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, {"rng": rng_state(), "loader": self.loader.state_dict()})
        full = full_state(self.model, self.optimizer) if self.fsdp else None     # collective: every rank
        if is_main():
            try:
                state = self.state(full)
                if per_rank is not None:
                    state["rank_states"] = per_rank
                atomic_save(state, self.run_dir / CHECKPOINT)
            except OSError as e:
                error = e
        if (any_rank_true(error is not None) if self.world > 1 else error is not None):   # also the barrier
            kept = f"the previous checkpoint (step {self._saved_step}) is intact" if self._saved_step is not None \
                else "no checkpoint was written before"
            why = (error.strerror or str(error)) if error is not None else "it failed on the main process"
            raise TrainingError(f"could not write the checkpoint {self.run_dir / CHECKPOINT} at step {self.step} "
                                f"({why}); {kept}")
        self._saved_step = self.step

    def load(self, path: Path) -> None:
        ck = safe_load(path, map_location=self.device)
        check_compatible(ck, self.cfg.method.name, self.cfg.backbone.name, path)   # one line, not a key traceback
        by_name = ck.get("optimizer_format") == OPTIMIZER_FORMAT
        if self.fsdp and not by_name:
            raise TrainingError(f"{path} was written without train.fsdp: resume it with train.fsdp=false")
        if self.fsdp:
            load_full_state(self.model, self.optimizer, ck["model"], ck["optimizer"])
        else:
            load_model_state(self.model, ck["model"], path)
            if by_name:                 # a sharded run resumed without sharding
                load_full_state(self.model, self.optimizer, ck["model"], ck["optimizer"])
            else:
                self.optimizer.load_state_dict(ck["optimizer"])
        self._saved_step = ck["step"]
        self.step, self.total_steps, self.elapsed = ck["step"], ck["total_steps"], ck["elapsed"]
        self._apply_new_budget(ck.get("config", {}).get("train", {}), path)
        if self.probe is not None and "online_probe" in ck:        # a checkpoint without one: a fresh probe
            self.probe.load_state_dict_full(ck["online_probe"])
        if ck["meta"].get("world_size", 1) == self.world:
            own = ck["rank_states"][self.rank] if "rank_states" in ck else ck      # older checkpoints: rank 0's
            set_rng_state(own["rng"])
            self.loader.load_state_dict(own["loader"])
        log.info("resumed from %s at step %d", path, self.step)

    def _apply_new_budget(self, saved: dict, path: Path) -> None:
        """A budget given with ``--resume`` (steps, epochs, minutes or schedule_epochs other than the
        checkpoint's) applies from the resumed step on: the schedules are recomputed for the new total
        (each value is the cosine of the new length at the current step, so the learning rate moves to
        where the new schedule has it). A budget the run has already used up is refused in one line."""
        t = self.cfg.train
        keys = ("steps", "epochs", "minutes", "schedule_epochs")
        changed = {k: (saved.get(k, 0), getattr(t, k)) for k in keys if saved.get(k, 0) != getattr(t, k)}
        if not changed:
            return
        planned = self._planned_steps()
        spent = []
        if planned and planned <= self.step:
            spent.append(f"{planned} steps")
        if t.minutes and t.minutes * 60 <= self.elapsed:
            spent.append(f"{t.minutes:g} minutes")
        if spent:
            raise TrainingError(f"{path} is already at step {self.step} ({self.elapsed / 60:.1f} min of training): "
                                f"the new budget of {' and '.join(spent)} is used up; give a larger one")
        old_total = self.total_steps
        self.total_steps = planned or self.total_steps        # minutes only: re-estimated from the new throughput
        if is_main():
            what = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items())
            log.info("new budget on resume (%s): the schedules are replanned for %s steps from step %d "
                     "(were %d steps)", what, self.total_steps or "the time budget's", self.step, old_total)

    # ---- logging ----------------------------------------------------------------------------
    def _open_logs(self) -> None:
        if not is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        # a new run in a folder without a checkpoint (one stopped before its first) starts a new log
        self.metrics = open(self.run_dir / "metrics.jsonl", "a" if self.resume else "w")
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                log.info("tensorboard is not installed (pip install 'selfsight[tensorboard]'): logging to metrics.jsonl only")

    def _log(self, row: dict) -> None:
        if not is_main():
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        ck_path = self.run_dir / CHECKPOINT
        if self.resume and not ck_path.exists():
            raise TrainingError(f"nothing to resume: {ck_path} does not exist (start a new run without resume)")
        if self.resume:
            self.load(ck_path)
            self._resumed_at = self.step
        elif ck_path.exists():
            raise TrainingError(f"{self.run_dir} already holds a run: pass --resume to continue it or choose another --out")
        created = is_main() and not self.run_dir.exists()
        self._open_logs()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _in_main_thread() else {}
        budget = t.minutes * 60 if t.minutes else math.inf
        if is_main():
            log.info("%s on %s: %d images, global batch %d (%d per process x %d), %d steps/epoch, lr %.4g "
                     "(base %.4g, %s scaling), precision %s", cfg.method.name, self.device, len(self.dataset),
                     cfg.data.batch_size, cfg.data.batch_size // self.world, self.world, self.steps_per_epoch,
                     self.lr, cfg.optim.lr, cfg.optim.lr_scaling, self.amp_dtype or "fp32")
        bar = None
        if t.progress and is_main():
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps or None, initial=self.step, dynamic_ncols=True, unit="step")
        self.model.train()
        window = self.new_window()
        if hasattr(self.dataset, "cache_file"):     # an array cache: the files it left out, counted once a session
            window["skipped"] = self.dataset.skipped
        try:
            self._loop(window, budget, bar, ck_path)
        except BaseException:
            if created and self.step == 0 and not ck_path.exists():
                self._remove_run_dir = True     # a new run that failed before its first step leaves no folder
            raise
        finally:
            if self.compiled:       # the model left behind (evaluation, export, pictures) runs eagerly
                uncompile_model(self.model)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if is_main():
                self.metrics.close()
                if self.writer is not None:
                    self.writer.close()
                if self._remove_run_dir:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
        result = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "minutes": self.elapsed / 60,
                  "run_dir": str(self.run_dir), "stopped_by_signal": self._stop_signal is not None,
                  "signal": int(self._stop_signal or 0), "nonfinite_steps": self.nonfinite_total}
        if self.nonfinite_total and is_main():
            log.warning("%d steps with a non-finite loss or gradients were skipped", self.nonfinite_total)
        if self._stop_signal is not None and is_main():
            log.warning("stopped by signal %d at step %d; checkpoint written, resume with --resume",
                        self._stop_signal, self.step)
        return result

    def _loop(self, window: dict, budget: float, bar, ck_path: Path) -> None:
        cfg, t = self.cfg, self.cfg.train
        session_start = time.perf_counter()
        start_elapsed = self.elapsed
        done = False
        batch = None
        while not done:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for batch in self.loader.epoch(epoch, offset):
                if self.channels_last:
                    batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
                sched = self.schedule(self.step)
                self._apply_schedule(sched)
                if self.compiled and self.step == self._resumed_at:
                    self._first_compiled_step(batch, sched, window)
                else:
                    self._step(batch, sched, window)
                if self.probe is not None:      # after the step: no influence on this step's gradients
                    with gathered(self.model):
                        self.probe.step(self.model.backbone, batch["views"][0], batch["label"], self.amp_dtype)
                window["skipped"] += batch["skipped"]
                self.step += 1
                self.elapsed = start_elapsed + time.perf_counter() - session_start
                if self.step == 1 + self._resumed_at:
                    self._t_step1, self._s_step1 = self.elapsed, self.step
                if budget < math.inf and not self._planned_steps() and self.step >= 10 and self.step % 10 == 0 \
                        and self.step > self._s_step1:
                    self._replan(budget, bar)
                if bar is not None:
                    bar.update(1)
                stop = self._should_stop(budget)
                # the online probe's epoch (or the last, partial one) goes in the row written at its end
                probe_row = self.probe.epoch_stats() if self.probe is not None \
                    and (self.step % self.steps_per_epoch == 0 or stop) else None
                log_now = self.step % t.log_every == 0 or probe_row is not None
                save_now = t.checkpoint_every and self.step % t.checkpoint_every == 0 and not stop
                if log_now or save_now or stop:
                    self._read_counters(ck_path)
                if log_now:
                    self._flush_window(window, sched, bar, probe_row)
                if save_now and not self.nonfinite_in_row:      # never checkpoint inside a non-finite streak
                    self.save()
                if stop:
                    done = True
                    break
        if window["steps"]:
            self._flush_window(window, self.schedule(self.step - 1), bar)
        self.save()
        if is_main() and self.hooks.write_artifacts is not None:     # e.g. a tokenizer's RUN/tokenizer.pt
            self.hooks.write_artifacts(self.run_dir)
        if batch is not None:
            self.write_pictures(batch)

    def _step(self, batch: dict, sched: dict, window: dict) -> None:
        """One optimizer step without a host read (outside log steps): backward always, the
        finiteness flag stays a device tensor (reduced over ranks on the device), a non-finite step
        is skipped on the device (``step_unless_nonfinite``) and ``after_step`` gets the flag as
        ``sched["finite"]`` so that no EMA takes NaN in; the counters accumulate on the device."""
        cfg, t = self.cfg, self.cfg.train
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.ddp(batch, sched)
        loss = out["loss"]
        if (self.step + 1) % t.log_every == 0 and is_main():
            window["monitor"] = embedding_stats(out["embedding"]) if "embedding" in out else {}
            window["monitor"].update({k: float(v) for k, v in out.get("monitor", {}).items()})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # a finite loss can still give non-finite gradients (seen with CPU bf16 convolutions on 1x1
        # maps): such a step would write NaN into the weights, so it is skipped too
        ok = all_ranks(torch.isfinite(loss.detach()) & gradients_finite(self.model.parameters()))
        if cfg.optim.clip_grad > 0:
            clip_gradients(self.model.parameters(), cfg.optim.clip_grad, cfg.optim.clip_mode)
        if self.hooks.before_optimizer_step is not None:      # e.g. DINO's frozen last layer
            self.hooks.before_optimizer_step(sched)
        step_unless_nonfinite(self.optimizer, ok)
        if self.hooks.after_step is not None:
            self.hooks.after_step({**sched, "finite": ok})
        window["loss"] += torch.where(ok, loss.detach().float(), 0.0)
        window["n"] += ok
        window["steps"] += 1
        bad = self._bad
        bad["run"].copy_(torch.where(ok, 0, bad["run"] + 1))
        torch.maximum(bad["worst"], bad["run"], out=bad["worst"])
        bad["total"] += ~ok

    def _first_compiled_step(self, batch: dict, sched: dict, window: dict) -> None:
        """The first step compiles (lazily). If compiling or that step fails (no C++ compiler, an
        unsupported op, a dynamo error), the model's state and the RNG are put back as they were
        before the step, the networks run eagerly and the step is run again: the run goes on."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}, rng_state()
        try:
            self._step(batch, sched, window)
        except Exception as e:
            uncompile_model(self.model)
            self.model.load_state_dict(saved[0])
            set_rng_state(saved[1])
            self.optimizer.zero_grad(set_to_none=True)
            self._compile_failed(e)
            self._step(batch, sched, window)

    def _agree_on_compile(self) -> None:
        """Several processes: each compiles a small function first, then all agree; where one cannot
        (no compiler on one node), every rank runs eagerly. Failing alone inside the first step, that
        rank would leave the others waiting in the step's collectives. A failure that every rank meets
        at the same point of the first step is still recovered there (``_first_compiled_step``)."""
        error = None
        if self.compiled:
            try:
                toolchain_check(self.device)
            except Exception as e:
                error = e
        ok = bool(all_ranks(torch.tensor(error is None and bool(self.compiled), device=self.device)))
        if not ok and self.compiled:
            uncompile_model(self.model)
            self._compile_failed(error or RuntimeError("train.compile failed on another process; all run eagerly"))

    def _compile_failed(self, error: Exception) -> None:
        """Warn in one line; the whole error (compiler errors run to pages) goes to RUN/compile_error.txt."""
        self.compiled = []
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        where = ""
        if is_main():
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "compile_error.txt").write_text("".join(traceback.format_exception(error)))
                where = f"; the full error is in {self.run_dir / 'compile_error.txt'}"
            except OSError:
                pass
        log.warning("train.compile failed (%s: %s); the run continues uncompiled (eager)%s",
                    type(error).__name__, reason, where)

    def _read_counters(self, ck_path: Path) -> None:
        """The non-finite counters read on the host (log and checkpoint steps, the last step): a
        streak of ``train.nonfinite_limit`` steps stops the run here, at most ``log_every - 1``
        steps after it reached the limit."""
        run, worst, total = torch.stack([self._bad["run"], self._bad["worst"], self._bad["total"]]).tolist()
        self._bad["worst"].copy_(self._bad["run"])
        self.nonfinite_in_row, self.nonfinite_total = run, total
        if worst >= self.cfg.train.nonfinite_limit:
            raise TrainingError(f"loss or gradients were not finite for {worst} steps in a row (step {self.step - 1});"
                                f" last good checkpoint kept in {ck_path}")

    def _should_stop(self, budget: float) -> bool:
        """Every rank must stop at the same step. A step budget is the same everywhere; clocks and
        signals differ between processes, so under DDP those stops are agreed (an all_reduce and a
        host read) every ``STOP_SYNC_EVERY`` steps only: a time or signal stop may overshoot by
        up to that many steps."""
        steps_done = bool(self.total_steps and self.step >= self.total_steps)
        local = self.elapsed >= budget or self._stop_signal is not None
        if self.world == 1:
            return steps_done or local
        if self._fixed_steps:
            if steps_done:
                return True
        else:                       # steps replanned from this rank's clock (time budget): agreed too
            local = local or steps_done
        return self.step % STOP_SYNC_EVERY == 0 and any_rank_true(local)

    def write_pictures(self, batch: dict) -> None:
        """The method's pictures of a batch (e.g. MIM masks and reconstructions) as
        ``run_dir/pictures/NAME.png`` (main process; a failure is logged, the run is kept). A
        sharded model computes them on every process (gathering parameters is collective)."""
        if self.hooks.pictures is None or not (is_main() or self.fsdp):
            return
        try:
            import torchvision.utils as vutils
            with gathered(self.model):
                pictures = self.hooks.pictures(batch)
            if not is_main():
                return
            out = self.run_dir / "pictures"
            out.mkdir(parents=True, exist_ok=True)
            for name, image in pictures.items():
                tmp = out / f".{name}.tmp.png"
                vutils.save_image(image.float().cpu(), tmp)
                os.replace(tmp, out / f"{name}.png")
        except Exception as e:                      # pictures are a by-product: never lose the run for them
            log.warning("could not write pictures: %s", e)

    def _replan(self, budget: float, bar) -> None:
        """Time budget without a step budget: the schedules' length is the steps that fit in the
        budget at the throughput measured so far (after the first step), re-estimated every 10
        steps so that a slower or faster machine still ends its cosine at the budget."""
        rate = (self.step - self._s_step1) / max(self.elapsed - self._t_step1, 1e-9)
        new_total = self.step + max(1, int((budget - self.elapsed) * rate))
        first = self.total_steps == 0
        self.total_steps = new_total
        if first and is_main():
            log.info("time budget %.1f min: schedules planned for ~%d steps (%.2f steps/s, re-estimated as it goes)",
                     budget / 60, new_total, rate)
        if bar is not None:
            bar.total = new_total
            bar.refresh()

    def new_window(self, t: float | None = None) -> dict:
        """The counters of one log window, started at ``t`` (now): loss and finite steps ``n`` stay on
        the device (read at the log step); the loader's wait and augmentation clocks as they stand."""
        return {"loss": torch.zeros((), device=self.device), "n": torch.zeros((), dtype=torch.long, device=self.device),
                "steps": 0, "t": time.perf_counter() if t is None else t, "wait": self.loader.wait,
                "aug": self.loader.augment_time, "skipped": 0}

    def _flush_window(self, w: dict, sched: dict, bar, extra: dict | None = None) -> None:
        now = time.perf_counter()
        span = max(now - w["t"], 1e-9)
        steps = max(w["steps"], 1)
        n_ok = int(w["n"])
        loss = (w["loss"] / max(n_ok, 1)).item()
        wait = (self.loader.wait - w["wait"]) / span
        aug = (self.loader.augment_time - w["aug"]) / span
        ips = steps * self.cfg.data.batch_size / span
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss,
               "lr": sched["lr"], "weight_decay": sched["weight_decay"], "images_per_s": ips,
               "data_wait": wait, "augment_share": aug, "skipped_files": w["skipped"],
               "nonfinite_steps": w["steps"] - n_ok, "elapsed_min": self.elapsed / 60}
        row.update({k: v for k, v in sched.items() if k not in row and k not in ("total_steps", "progress")})
        row.update(w.pop("monitor", {}))
        if extra:
            row.update(extra)
            if is_main():
                log.info("epoch %.2f: online probe train top-1 %.4f, loss %.4f", row["epoch"],
                         extra["online_probe_top1"], extra["online_probe_loss"])
        self._log(row)
        warning = collapse_warning(row)
        if warning and is_main():
            self.collapse_warnings += 1
            if self.collapse_warnings in (1, 2, 5) or self.collapse_warnings % 20 == 0:
                log.warning("step %d: %s (see docs/methods.md, collapse)", self.step, warning)
        if bar is not None:
            extra = {"collapse": "YES"} if warning else {}
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", wait=f"{100 * wait:.0f}%", **extra)
        w.update(self.new_window(now))


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def pretrain(cfg: RunConfig, run_dir: str | Path, resume: bool = False, dataset=None,
             backbone: nn.Module | None = None) -> dict:
    """Pretrain ``cfg.method`` and write ``run_dir/{checkpoint.pt, config.yaml, metrics.jsonl, tb/}``.

    ``dataset``: any data source (default: ``cfg.data.train``); ``backbone``: any ``nn.Module``
    (wrapped behind the backbone contract; default: ``cfg.backbone``). A run with a custom
    backbone is evaluated from Python: its checkpoint cannot rebuild the module by itself.
    """
    return Trainer(cfg, run_dir, resume, dataset, backbone).fit()
