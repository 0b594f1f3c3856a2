"""A run's checkpoint as the trainer writes and reads it: the state of every part of the run
(``Checkpointer``) and the random state a resumed run needs to continue exactly (``rng_state``).
Writing and reading the file itself is ``files`` (atomic, ``weights_only``), its layout ``runs``."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from selfsight import __version__
from selfsight.config import to_dict
from selfsight.engine.errors import TrainingError
from selfsight.engine.sharding import OPTIMIZER_FORMAT, full_state, load_full_state
from selfsight.files import FORMAT_VERSION, atomic_save, load_model_state, safe_load
from selfsight.nn.distributed import any_rank_true, is_main
from selfsight.runs import CHECKPOINT, check_compatible, preprocess_meta


def rng_state() -> dict:
    """Every random state that shapes the next steps, as tensors/ints (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())          # a checkpoint read with map_location=cuda
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Checkpointer:
    """Writes and reads a run's ``checkpoint.pt`` (``runs`` describes the layout): the model, the
    optimizer, the online probe, the step counters, the RNG and loader states (under DDP each
    process's own, ``rank_states``) and the config with the preprocessing metadata. The file is
    written atomically by the main process; a failed write stops every process with one line and
    leaves the previous checkpoint intact."""

    def __init__(self, parts, cfg, run_dir: Path):
        self.parts, self.cfg, self.path = parts, cfg, run_dir / CHECKPOINT
        self.saved_step: int | None = None    # of the last checkpoint written or resumed from
        self.starting = parts.starting        # where the starting weights came from, kept across resumes
        self.trackers: dict = {}              # {tracker: its run id} (W&B, MLflow): --resume continues them

    def state(self, step: int, total_steps: int, elapsed: float, full: tuple[dict, dict] | None = None) -> dict:
        """The checkpoint. ``full``: the (model, optimizer) states of a sharded model, gathered by
        ``sharding.full_state`` (the optimizer's keyed by parameter names)."""
        p = self.parts
        probe = {"online_probe": p.probe.state_dict_full()} if p.probe is not None else {}
        model, optimizer = full if full is not None else (p.model.state_dict(), p.optimizer.state_dict())
        fmt = {"optimizer_format": OPTIMIZER_FORMAT} if full is not None else {}
        if p.scaler is not None:            # fp16: the loss scale and its growth counter
            fmt["grad_scaler"] = p.scaler.state_dict()
        return {**probe, **fmt, "format_version": FORMAT_VERSION, "model": model,
                "optimizer": optimizer, "step": step, "total_steps": total_steps,
                "elapsed": elapsed, "rng": rng_state(), "loader": p.loader.state_dict(),
                "config": to_dict(self.cfg),
                "meta": {"method": self.cfg.method.name, "backbone": self.cfg.backbone.name,
                         "preprocess": preprocess_meta(p.recipe, p.channels), "selfsight": __version__,
                         "world_size": p.world, **({"starting_weights": self.starting} if self.starting else {}),
                         **({"trackers": self.trackers} if self.trackers else {})}}

    def save(self, step: int, total_steps: int, elapsed: float) -> None:
        p = self.parts
        error, per_rank = None, None
        if p.world > 1:          # each process's own RNG and loader streams, so a resumed DDP run continues exactly
            per_rank = [None] * p.world
            dist.all_gather_object(per_rank, {"rng": rng_state(), "loader": p.loader.state_dict()})
        full = full_state(p.model, p.optimizer) if p.fsdp else None     # collective: every rank
        if is_main():
            try:
                state = self.state(step, total_steps, elapsed, full)
                if per_rank is not None:
                    state["rank_states"] = per_rank
                atomic_save(state, self.path)
            except OSError as e:
                error = e
        if (any_rank_true(error is not None) if p.world > 1 else error is not None):   # also the barrier
            kept = f"the previous checkpoint (step {self.saved_step}) is intact" if self.saved_step is not None \
                else "no checkpoint was written before"
            why = (error.strerror or str(error)) if error is not None else "it failed on the main process"
            raise TrainingError(f"could not write the checkpoint {self.path} at step {step} ({why}); {kept}")
        self.saved_step = step

    def load(self, path: Path) -> dict:
        """Load model, optimizer, probe and (same number of processes) RNG and loader states from
        ``path``; returns the checkpoint for its counters and config."""
        p = self.parts
        ck = safe_load(path, map_location=p.device)
        check_compatible(ck, self.cfg.method.name, self.cfg.backbone.name, path)   # one line, not a key traceback
        by_name = ck.get("optimizer_format") == OPTIMIZER_FORMAT
        if p.fsdp and not by_name:
            raise TrainingError(f"{path} was written without train.fsdp: resume it with train.fsdp=false")
        if p.fsdp:
            load_full_state(p.model, p.optimizer, ck["model"], ck["optimizer"])
        else:
            load_model_state(p.model, ck["model"], path)
            if by_name:                 # a sharded run resumed without sharding
                load_full_state(p.model, p.optimizer, ck["model"], ck["optimizer"])
            else:
                p.optimizer.load_state_dict(ck["optimizer"])
        if p.scaler is not None and "grad_scaler" in ck:     # else (a bf16/fp32 checkpoint): the initial scale
            p.scaler.load_state_dict(ck["grad_scaler"])
        self.saved_step = ck["step"]
        self.starting = ck["meta"].get("starting_weights", self.starting)
        self.trackers = dict(ck["meta"].get("trackers", {}))
        if p.probe is not None and "online_probe" in ck:        # a checkpoint without one: a fresh probe
            p.probe.load_state_dict_full(ck["online_probe"])
        if ck["meta"].get("world_size", 1) == p.world:
            own = ck["rank_states"][p.rank] if "rank_states" in ck else ck      # older checkpoints: rank 0's
            set_rng_state(own["rng"])
            p.loader.load_state_dict(own["loader"])
        return ck
