"""How long a run trains and every per-step schedule (methods.md §0.2).

The budget is the first of ``train.steps``, ``train.epochs`` and ``train.minutes`` to run out.
Every schedule is a function of (step, total steps): the learning rate (linear warm-up, then
cosine to ``optim.min_lr``), the weight decay (cosine to ``optim.weight_decay_end``) and the
values a method asks for (``schedules()`` hook, e.g. an EMA momentum 0.996 -> 1). With a time
budget alone the total is the steps that fit in it at the measured throughput, re-estimated every
10 steps (``replan``); until then 10 epochs are assumed. A budget given on resume replaces the
saved one from the resumed step on (``resume``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from selfsight.engine.errors import TrainingError
from selfsight.nn.distributed import any_rank_true, is_main
from selfsight.schedules import cosine, scaled_lr

log = logging.getLogger("selfsight")
STOP_SYNC_EVERY = 10        # DDP: steps between the all_reduce that agrees on a time or signal stop
REPLAN_EVERY = 10           # a time budget's length is re-estimated every this many steps


class Budget:
    def __init__(self, cfg, steps_per_epoch: int, hooks, world: int = 1):
        self.train, self.optim, self.hooks, self.world = cfg.train, cfg.optim, hooks, world
        self.steps_per_epoch = steps_per_epoch
        self.lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.base_batch, cfg.optim.lr_scaling)
        self.seconds = cfg.train.minutes * 60 if cfg.train.minutes else math.inf
        self.total_steps = self.planned_steps()
        self.fixed_steps = bool(self.total_steps)       # a step budget every rank knows in advance
        self.t_step1 = self.s_step1 = None              # elapsed and step after a session's first step

    def planned_steps(self) -> int:
        """The steps the config fixes (0: unknown until the throughput is measured, minutes only)."""
        t, spe = self.train, self.steps_per_epoch
        limits = [int(x) for x in (t.steps, math.ceil(t.epochs * spe) if t.epochs else 0) if x]
        if t.schedule_epochs:
            limits.append(int(t.schedule_epochs * spe))
        return min(limits) if limits else 0

    def warmup_steps(self) -> int:
        o = self.optim
        total = self.total_steps or 10 * self.steps_per_epoch
        return int(o.warmup_epochs * self.steps_per_epoch) if o.warmup_epochs else int(o.warmup_fraction * total)

    def schedule(self, step: int) -> dict:
        """``sched`` of one step: step, total_steps, epoch, progress, lr, weight_decay and the method's values."""
        o = self.optim
        total = max(self.total_steps or 10 * self.steps_per_epoch, step + 1)
        lr = cosine(step, total, self.lr, o.min_lr, self.warmup_steps())
        wd_end = o.weight_decay if o.weight_decay_end < 0 else o.weight_decay_end
        wd = cosine(step, total, o.weight_decay, wd_end)
        sched = {"step": step, "total_steps": total, "epoch": step / self.steps_per_epoch,
                 "progress": step / total, "lr": lr, "weight_decay": wd}
        for name, (start, end) in self.hooks.scheduled().items():      # e.g. {"momentum": (0.996, 1.0)}
            sched[name] = cosine(step, total, start, end)
        return sched

    def apply(self, optimizer, sched: dict) -> None:
        """The step's learning rate and weight decay into the optimizer's groups."""
        for g in optimizer.param_groups:
            g["lr"] = self.lr if g.get("fixed_lr") else sched["lr"]       # fixed: e.g. SimSiam's predictor
            if "lr_scale" in g:                                           # backbone.lr_scale
                g["lr"] *= g["lr_scale"]
            if g.get("apply_wd", True):
                g["weight_decay"] = sched["weight_decay"]

    def stepped(self, step: int, elapsed: float, first: bool) -> bool:
        """After a step: note a session's first step (``first``); with a time budget alone, re-plan
        every ``REPLAN_EVERY`` steps. True when the total changed."""
        if first:
            self.t_step1, self.s_step1 = elapsed, step
        due = self.seconds < math.inf and not self.planned_steps() and step >= REPLAN_EVERY \
            and step % REPLAN_EVERY == 0 and step > self.s_step1
        return self.replan(step, elapsed) if due else False

    def replan(self, step: int, elapsed: float) -> bool:
        """The schedules' length: the steps that fit in the time left at the throughput measured
        since the session's first step, so a slower or faster machine ends its cosine at the budget."""
        rate = (step - self.s_step1) / max(elapsed - self.t_step1, 1e-9)
        new_total = step + max(1, int((self.seconds - elapsed) * rate))
        first = self.total_steps == 0
        self.total_steps = new_total
        if first and is_main():
            log.info("time budget %.1f min: schedules planned for ~%d steps (%.2f steps/s, re-estimated as it goes)",
                     self.seconds / 60, new_total, rate)
        return True

    def resume(self, saved: dict, step: int, total_steps: int, elapsed: float, path: Path) -> None:
        """The checkpoint's total, or a budget given with ``--resume`` (steps, epochs, minutes or
        schedule_epochs other than ``saved``, the checkpoint's train config) from the resumed step
        on: the schedules are recomputed for the new total (each value is the cosine of the new length
        at the current step). A budget the run has already used up is refused in one line."""
        self.total_steps = total_steps
        keys = ("steps", "epochs", "minutes", "schedule_epochs")
        changed = {k: (saved.get(k, 0), getattr(self.train, k)) for k in keys if saved.get(k, 0) != getattr(self.train, k)}
        if not changed:
            return
        planned = self.planned_steps()
        spent = [f"{planned} steps"] if planned and planned <= step else []
        if self.train.minutes and self.seconds <= elapsed:
            spent.append(f"{self.train.minutes:g} minutes")
        if spent:
            raise TrainingError(f"{path} is already at step {step} ({elapsed / 60:.1f} min of training): "
                                f"the new budget of {' and '.join(spent)} is used up; give a larger one")
        self.total_steps = planned or total_steps        # minutes only: re-estimated from the new throughput
        if is_main():
            what = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items())
            log.info("new budget on resume (%s): the schedules are replanned for %s steps from step %d "
                     "(were %d steps)", what, self.total_steps or "the time budget's", step, total_steps)

    def should_stop(self, step: int, elapsed: float, signalled: bool) -> bool:
        """Every rank must stop at the same step. A step budget is the same everywhere; clocks and
        signals differ between processes, so under DDP those stops are agreed (an all_reduce and a
        host read) every ``STOP_SYNC_EVERY`` steps only: a time or signal stop may overshoot by up
        to that many steps."""
        steps_done = bool(self.total_steps and step >= self.total_steps)
        local = elapsed >= self.seconds or signalled
        if self.world == 1:
            return steps_done or local
        if self.fixed_steps:
            if steps_done:
                return True
        else:                       # steps replanned from this rank's clock (time budget): agreed too
            local = local or steps_done
        return step % STOP_SYNC_EVERY == 0 and any_rank_true(local)
