"""The one training loop: backward, clipping, the optimizer step and every schedule, under bf16
autocast and DDP, with checkpoints and logs. Methods only compute ``{"loss": ...}`` (house plan).

The parts are built by ``assemble``; the budget and schedules are ``Budget``; checkpoints are
``Checkpointer``; ``metrics.jsonl`` and the trackers of ``train.loggers`` are ``RunLog``. What is
here reads top to bottom: ``fit`` (start, loop, finish), ``_loop`` (one epoch after another, one
step after another, and what a step is followed by) and ``_step`` (one optimizer step without a
host read).
"""
from __future__ import annotations

import copy
import logging
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

from selfsight import progress
from selfsight.backbones.factory import custom_name
from selfsight.config import RunConfig
from selfsight.engine.assemble import assemble
from selfsight.engine.budget import STOP_SYNC_EVERY, Budget  # noqa: F401  (STOP_SYNC_EVERY: part of the contract)
from selfsight.engine.checkpoint import Checkpointer
from selfsight.engine.compile import first_step, uncompile_model
from selfsight.engine.errors import TrainingError
from selfsight.engine.logs import RunLog, Window, write_pictures
from selfsight.engine.monitor import embedding_stats
from selfsight.engine.optim import NonfiniteCounts, clip_gradients, gradients_finite, step_unless_nonfinite
from selfsight.engine.sharding import gathered
from selfsight.engine.trackers import check_loggers
from selfsight.nn.distributed import all_ranks, is_main
from selfsight.nn.precision import autocast, precision_name
from selfsight.progress import Progress

log = logging.getLogger("selfsight")

__all__ = ["Trainer", "TrainingError", "pretrain"]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, dataset=None,
                 backbone: nn.Module | None = None):
        t = cfg.train
        if not (t.epochs or t.steps or t.minutes):
            raise ValueError("give a budget: train.epochs, train.steps or train.minutes (--epochs/--steps/--minutes)")
        check_loggers(t)            # a tracker's missing extra: one line before the data and model are built
        if backbone is not None and not cfg.backbone.name.startswith("python:"):
            cfg = copy.deepcopy(cfg)                # the run records what it trained (runs.rebuild_hint)
            cfg.backbone.name = custom_name(backbone)
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.parts = p = assemble(cfg, self.run_dir, dataset, backbone, fresh=not resume)
        self.device, self.model, self.ddp, self.hooks = p.device, p.model, p.ddp, p.hooks
        self.loader, self.optimizer, self.probe, self.dataset = p.loader, p.optimizer, p.probe, p.dataset
        self.amp_dtype, self.channels_last, self.compiled = p.amp_dtype, p.channels_last, p.compiled
        self.steps_per_epoch = p.loader.steps_per_epoch
        self.budget = Budget(cfg, self.steps_per_epoch, p.hooks, p.world)
        self.checkpoints = Checkpointer(p, cfg, self.run_dir)
        self.log = RunLog(cfg, self.run_dir, p.loader, p.device, self.steps_per_epoch)
        self.nonfinite = NonfiniteCounts(p.device)
        self.step = 0
        self.elapsed = 0.0            # training seconds over all sessions (for the minutes budget)
        self._resumed_at = 0          # the step this session started from
        self._stop_signal = None
        self._remove_run_dir = False  # set when a new run fails before its first step

    def schedule(self, step: int) -> dict:
        return self.budget.schedule(step)

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        self.checkpoints.save(self.step, self.budget.total_steps, self.elapsed)

    def load(self, path: Path) -> None:
        ck = self.checkpoints.load(path)
        self.step, self.elapsed = ck["step"], ck["elapsed"]
        self.budget.resume(ck.get("config", {}).get("train", {}), ck["step"], ck["total_steps"], ck["elapsed"], path)
        log.info("resumed from %s at step %d", path, self.step)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        ck_path = self.checkpoints.path
        if self.resume and not ck_path.exists():
            raise TrainingError(f"nothing to resume: {ck_path} does not exist (start a new run without resume)")
        if self.resume:
            self.load(ck_path)
            self._resumed_at = self.step
        elif ck_path.exists():
            raise TrainingError(f"{self.run_dir} already holds a run: pass --resume to continue it or choose another --out")
        created = is_main() and not self.run_dir.exists()
        self.checkpoints.trackers = self.log.open(self.resume, self.checkpoints.trackers, self.step)
        in_main_thread = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if in_main_thread else {}
        self._log_start()
        bar = None
        if self.cfg.train.progress and is_main():     # a bar on a terminal, else a line every 30 s
            bar = Progress(self.budget.total_steps or None, "training", unit="steps", initial=self.step,
                           period=progress.TRAINING_PERIOD, leave=True)
        self.model.train()
        window = self.log.window()
        if hasattr(self.dataset, "cache_file"):     # an array cache: the files it left out, counted once a session
            window.skipped = self.dataset.skipped
        try:
            self._loop(window, bar)
        except BaseException:
            if created and self.step == 0 and not ck_path.exists():
                self._remove_run_dir = True     # a new run that failed before its first step leaves no folder
            raise
        finally:
            self._finish(old_handlers, bar)
        return self._result()

    def _loop(self, window: Window, bar) -> None:
        t = self.cfg.train
        session_start, start_elapsed = time.perf_counter(), self.elapsed
        done, batch = False, None
        while not done:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for batch in self.loader.epoch(epoch, offset):
                if self.channels_last:
                    batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
                sched = self.schedule(self.step)
                self.budget.apply(self.optimizer, sched)
                if self.compiled and self.step == self._resumed_at:     # the first step compiles (or falls back)
                    if not first_step(lambda: self._step(batch, sched, window), self.model, self.optimizer,
                                      self.run_dir):
                        self.compiled = []
                else:
                    self._step(batch, sched, window)
                if self.probe is not None:      # after the step: no influence on this step's gradients
                    with gathered(self.model):
                        self.probe.step(self.model.backbone, batch["views"][0], batch["label"], self.amp_dtype)
                window.skipped += batch["skipped"]
                self.step += 1
                self.elapsed = start_elapsed + time.perf_counter() - session_start
                if self.budget.stepped(self.step, self.elapsed, first=self.step == 1 + self._resumed_at) \
                        and bar is not None:
                    bar.set_total(self.budget.total_steps)
                if bar is not None:
                    bar.update(1)
                done = self.budget.should_stop(self.step, self.elapsed, self._stop_signal is not None)
                # the online probe's epoch (or the last, partial one) goes in the row written at its end
                probe_row = self.probe.epoch_stats() if self.probe is not None \
                    and (self.step % self.steps_per_epoch == 0 or done) else None
                log_now = self.step % t.log_every == 0 or probe_row is not None
                save_now = t.checkpoint_every and self.step % t.checkpoint_every == 0 and not done
                if log_now or save_now or done:
                    self._read_counters()
                if log_now:
                    window = self.log.flush(window, sched, self.step, self.elapsed, bar, probe_row)
                if save_now and not self.nonfinite.in_row:      # never checkpoint inside a non-finite streak
                    self.save()
                if done:
                    break
        if window.steps:
            self.log.flush(window, self.schedule(self.step - 1), self.step, self.elapsed, bar)
        self.save()
        if is_main() and self.hooks.write_artifacts is not None:     # e.g. a tokenizer's RUN/tokenizer.pt
            self.hooks.write_artifacts(self.run_dir)
        pictures = self.write_pictures(batch) if batch is not None else {}
        self.log.finish(self._summary(), pictures)         # to the trackers of train.loggers

    def _step(self, batch: dict, sched: dict, window: Window) -> None:
        """One optimizer step without a host read (outside log steps): backward always, the
        finiteness flag stays a device tensor (reduced over ranks on the device), a non-finite step
        is skipped on the device (``step_unless_nonfinite``) and ``after_step`` gets the flag as
        ``sched["finite"]`` so that no EMA takes NaN in; the counters accumulate on the device."""
        o = self.cfg.optim
        with autocast(self.device, self.amp_dtype):
            out = self.ddp(batch, sched)
        loss = out["loss"]
        if (self.step + 1) % self.cfg.train.log_every == 0 and is_main():
            window.monitor = embedding_stats(out["embedding"]) if "embedding" in out else {}
            window.monitor.update({k: float(v) for k, v in out.get("monitor", {}).items()})
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.parts.scaler
        if scaler is None:
            loss.backward()
        else:                   # fp16: the scaled loss backward, the gradients unscaled before any use
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
        # a finite loss can still give non-finite gradients (seen with CPU bf16 convolutions on 1x1
        # maps; fp16 overflows): such a step would write NaN into the weights, so it is skipped too
        loss_ok = torch.isfinite(loss.detach())
        ok = all_ranks(loss_ok & gradients_finite(self.model.parameters()))
        if o.clip_grad > 0:
            clip_gradients(self.model.parameters(), o.clip_grad, o.clip_mode)
        if self.hooks.before_optimizer_step is not None:      # e.g. DINO's frozen last layer
            self.hooks.before_optimizer_step(sched)
        step_unless_nonfinite(self.optimizer, ok)
        if scaler is not None:
            scaler.update()     # an overflow halves the scale; 2000 clean steps double it
        if self.hooks.after_step is not None:
            self.hooks.after_step({**sched, "finite": ok})
        window.loss += torch.where(ok, loss.detach().float(), 0.0)
        window.n += ok
        window.steps += 1
        # an fp16 overflow with a finite loss is the scaler's business: counted, never a streak
        self.nonfinite.add(ok, ok if scaler is None else all_ranks(loss_ok))
        if scaler is not None and (self.step + 1) % self.cfg.train.log_every == 0 and is_main():
            window.monitor["grad_scale"] = scaler.get_scale()

    def _read_counters(self) -> None:
        """The non-finite counters read on the host (log and checkpoint steps, the last step): a
        streak of ``train.nonfinite_limit`` steps stops the run here, at most ``log_every - 1``
        steps after it reached the limit."""
        worst = self.nonfinite.read()
        if worst >= self.cfg.train.nonfinite_limit:
            raise TrainingError(f"loss or gradients were not finite for {worst} steps in a row (step {self.step - 1});"
                                f" last good checkpoint kept in {self.checkpoints.path}")

    def write_pictures(self, batch: dict) -> dict:
        return write_pictures(self.hooks, self.model, batch, self.run_dir, self.parts.fsdp)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # ---- start and finish ------------------------------------------------------------------
    def _log_start(self) -> None:
        if not is_main():
            return
        cfg, p = self.cfg, self.parts
        log.info("%s on %s: %d images, global batch %d (%d per process x %d), %d steps/epoch, lr %.4g "
                 "(base %.4g, %s scaling), precision %s", cfg.method.name, self.device, len(self.dataset),
                 cfg.data.batch_size, cfg.data.batch_size // p.world, p.world, self.steps_per_epoch,
                 self.budget.lr, cfg.optim.lr, cfg.optim.lr_scaling,
                 precision_name(self.amp_dtype) + (" with a gradient scaler" if self.parts.scaler else ""))

    def _finish(self, old_handlers: dict, bar) -> None:
        if self.compiled:       # the model left behind (evaluation, export, pictures) runs eagerly
            uncompile_model(self.model)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        if is_main():
            self.log.close()
            if self._remove_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def _result(self) -> dict:
        total = self.nonfinite.seen
        if total and is_main():
            log.warning("%d steps with a non-finite loss or gradients were skipped%s", total,
                        "; under fp16 these include the overflows of the gradient scaler's first steps, where it "
                        "lowers its scale until the gradients fit (grad_scale in metrics.jsonl)"
                        if self.parts.scaler is not None else "")
        if self._stop_signal is not None and is_main():
            log.warning("stopped by signal %d at step %d; checkpoint written, resume with --resume",
                        self._stop_signal, self.step)
        return {**self._summary(), "run_dir": str(self.run_dir), "signal": int(self._stop_signal or 0)}

    def _summary(self) -> dict:
        return {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "minutes": self.elapsed / 60,
                "stopped_by_signal": self._stop_signal is not None, "nonfinite_steps": self.nonfinite.seen}


def pretrain(cfg: RunConfig, run_dir: str | Path, resume: bool = False, dataset=None,
             backbone: nn.Module | None = None) -> dict:
    """Pretrain ``cfg.method`` and write ``run_dir/{checkpoint.pt, config.yaml, metrics.jsonl, tb/}``.

    ``dataset``: any data source (default: ``cfg.data.train``); ``backbone``: any ``nn.Module``
    (wrapped behind the backbone contract; default: ``cfg.backbone``). A run with a custom
    module records it as ``backbone.name=custom:package.module.Class``: its checkpoint cannot
    rebuild the module by itself, so it is loaded from Python (``load_run(run, backbone=Class(...))``,
    ``load_backbone(run, backbone=...)``); a module built by a factory, given as
    ``backbone.name=python:package.module:factory``, is rebuilt by the CLI too.
    """
    return Trainer(cfg, run_dir, resume, dataset, backbone).fit()
