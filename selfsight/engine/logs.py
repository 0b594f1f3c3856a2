"""What a run writes beside its checkpoint while it trains: ``config.yaml``, ``metrics.jsonl`` (one
row per log window; the trackers of ``train.loggers`` get the same scalars: ``trackers``), the
collapse warnings, and the method's pictures at the end. Only the main process writes.

A log window's counters (``Window``) stay on the device between log steps: the summed loss of
the finite steps and their count, so a step reads nothing back; ``flush`` reads them once.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.utils as vutils

from selfsight.config import save_config, to_dict
from selfsight.engine.errors import TrainingError
from selfsight.engine.monitor import collapse_warning
from selfsight.engine.sharding import gathered
from selfsight.engine.trackers import Start, Trackers, flat_params, logger_names, open_trackers, scalars
from selfsight.nn.distributed import any_rank_true, is_main

log = logging.getLogger("selfsight")


@dataclass
class Window:
    """The counters of one log window: ``loss`` and finite steps ``n`` on the device; the loader's
    wait and augmentation clocks when it started; files skipped; the monitor values of its last step."""
    loss: torch.Tensor
    n: torch.Tensor
    t: float
    wait: float
    aug: float
    steps: int = 0
    skipped: int = 0
    monitor: dict = field(default_factory=dict)


class RunLog:
    def __init__(self, cfg, run_dir: Path, loader, device: torch.device, steps_per_epoch: int):
        self.cfg, self.run_dir, self.loader, self.device = cfg, run_dir, loader, device
        self.steps_per_epoch = steps_per_epoch
        self.metrics = None
        self.trackers = Trackers([])
        self.status = "failed"          # until ``finish``: how the trackers' runs end
        self.collapse_warnings = 0

    def open(self, resume: bool, tracker_ids: dict, step: int) -> dict:
        """``config.yaml`` (the config that runs), ``metrics.jsonl`` (appended on resume; a new run in
        a folder without a checkpoint, one stopped before its first, starts a new log), the trackers of
        ``train.loggers`` (``tracker_ids``: their runs, from the checkpoint). Returns the tracker run
        ids for the checkpoint (those of trackers left out this session are kept). A failure on the
        main process (a tracker that cannot start) stops every process: they agree on it here."""
        ids, error = tracker_ids, None
        if is_main():
            try:
                ids = self._open(resume, tracker_ids, step)
            except Exception as e:
                error = e
        if any_rank_true(error is not None):
            raise error if error is not None else TrainingError("the run could not start on the main process")
        return ids

    def _open(self, resume: bool, tracker_ids: dict, step: int) -> dict:
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        start = Start(self.run_dir, self.cfg.train.project, flat_params(to_dict(self.cfg)), None, resume, step)
        try:
            self.trackers = open_trackers(logger_names(self.cfg.train), start, tracker_ids)
        except Exception:
            if created:                 # a tracker that cannot start leaves no new folder behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.metrics = open(self.run_dir / "metrics.jsonl", "a" if resume else "w")
        return {**tracker_ids, **self.trackers.ids}

    def finish(self, summary: dict, pictures: dict) -> None:
        """The end of a session that trained to its budget or to a signal: the pictures written and
        the summary (``final/steps``, ``final/minutes``, ...) go to the trackers."""
        step = summary["steps"]
        self.trackers.pictures(pictures, step)
        self.trackers.summary({f"final/{k}": v for k, v in summary.items()}, step)
        self.status = "stopped" if summary.get("stopped_by_signal") else "finished"

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.trackers.close(self.status)

    def window(self, t: float | None = None) -> Window:
        """A new log window started at ``t`` (now)."""
        return Window(torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long, device=self.device),
                      time.perf_counter() if t is None else t, self.loader.wait, self.loader.augment_time)

    def write(self, row: dict) -> None:
        if not is_main():
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.trackers.log(scalars(row), row["step"])

    def flush(self, w: Window, sched: dict, step: int, elapsed: float, bar=None, extra: dict | None = None) -> Window:
        """Write the window's row (the one host read of its counters) and return the next window."""
        now = time.perf_counter()
        span = max(now - w.t, 1e-9)
        n_ok = int(w.n)
        loss = (w.loss / n_ok).item() if n_ok else float("nan")     # no step of the window was taken
        wait = (self.loader.wait - w.wait) / span
        aug = (self.loader.augment_time - w.aug) / span
        ips = max(w.steps, 1) * self.cfg.data.batch_size / span
        row = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": loss,
               "lr": sched["lr"], "weight_decay": sched["weight_decay"], "images_per_s": ips,
               "data_wait": wait, "augment_share": aug, "skipped_files": w.skipped,
               "nonfinite_steps": w.steps - n_ok, "elapsed_min": elapsed / 60}
        row.update({k: v for k, v in sched.items() if k not in row and k not in ("total_steps", "progress")})
        row.update(w.monitor)
        if extra:
            row.update(extra)
            if is_main():
                log.info("epoch %.2f: online probe train top-1 %.4f, loss %.4f", row["epoch"],
                         extra["online_probe_top1"], extra["online_probe_loss"])
        self.write(row)
        warning = collapse_warning(row)
        if warning and is_main():
            self.collapse_warnings += 1
            if self.collapse_warnings in (1, 2, 5) or self.collapse_warnings % 20 == 0:
                log.warning("step %d: %s (see docs/methods.md, collapse)", step, warning)
        if bar is not None:
            flag = {"collapse": "YES"} if warning else {}
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", wait=f"{100 * wait:.0f}%", **flag)
        return self.window(now)


def write_pictures(hooks, model, batch: dict, run_dir: Path, sharded: bool) -> dict:
    """The method's pictures of a batch (e.g. MIM masks and reconstructions) as
    ``run_dir/pictures/NAME.png`` (main process; a failure is logged, the run is kept). A sharded
    model computes them on every process (gathering parameters is collective). Returns
    ``{name: path}`` of the files written."""
    written = {}
    if hooks.pictures is None or not (is_main() or sharded):
        return written
    try:
        with gathered(model):
            pictures = hooks.pictures(batch)
        if not is_main():
            return written
        out = run_dir / "pictures"
        out.mkdir(parents=True, exist_ok=True)
        for name, image in pictures.items():
            tmp = out / f".{name}.tmp.png"
            vutils.save_image(image.float().cpu(), tmp)
            os.replace(tmp, out / f"{name}.png")
            written[name] = out / f"{name}.png"
    except Exception as e:                      # pictures are a by-product: never lose the run for them
        log.warning("could not write pictures: %s", e)
    return written
