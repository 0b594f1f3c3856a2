"""Experiment trackers: where a run's scalars go besides ``metrics.jsonl`` (``train.loggers``):
TensorBoard (``tb/``), Weights & Biases, MLflow and ``metrics.csv``.

Each tracker is a small class with the same five members: ``id`` (its run in the tracker, kept in
the checkpoint so that ``--resume`` continues that run), ``log(scalars, step)`` (the rows of
``metrics.jsonl``), ``pictures({name: png}, step)``, ``summary(values, step)`` and
``close(status)``; a named function opens each (``OPENERS``). ``Trackers`` calls them all: a tracker
that raises mid-run (network down, quota, a full disk) is dropped with one warning and the run goes
on with the others. W&B and MLflow are optional extras, imported only when named; a missing one is
one line before the run is built (``check_loggers``). Only the main process opens trackers.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from selfsight.engine.errors import TrainingError
from selfsight.files import atomic_write

log = logging.getLogger("selfsight")

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}       # tracker -> the module its extra installs


def logger_names(train) -> list[str]:
    """``train.loggers`` in order, once each; ``train.tensorboard=false`` (older recipes) leaves
    tensorboard out."""
    return [n for n in dict.fromkeys(train.loggers) if n != "tensorboard" or train.tensorboard]


def check_loggers(train) -> None:
    """One line (``ValueError``) for a tracker of ``train.loggers`` that cannot work, said before
    the run is built: its extra is not installed, or MLflow's tracking URI is its default SQLite
    store, which needs SQLAlchemy (``mlflow-skinny``, the extra, lacks it). TensorBoard, the default,
    is not checked: without it the run logs without ``tb/``."""
    names = logger_names(train)
    for name in names:
        if name in EXTRAS:
            try:
                importlib.import_module(EXTRAS[name])
            except ImportError:
                raise ValueError(f"train.loggers names {name}, which is not installed: "
                                 f"pip install 'selfsight[{name}]'") from None
    if "mlflow" in names:
        import mlflow  # optional extra: selfsight[mlflow]
        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
            raise ValueError(f"train.loggers names mlflow, whose tracking URI {uri} needs SQLAlchemy: pip install "
                             "mlflow (the full package), or set MLFLOW_TRACKING_URI to a server (http://HOST:5000) "
                             "or to file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true")


def flat_params(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{"optim.lr": 0.3, ...}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(row: dict) -> dict:
    """The numbers of a ``metrics.jsonl`` row, without its ``step``."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


@dataclass
class Start:
    """What a tracker is opened with."""
    run_dir: Path
    project: str          # train.project: the W&B project, the MLflow experiment
    params: dict          # the resolved config, flattened
    run_id: str | None    # the tracker's run for this folder, from the checkpoint (None: a new one)
    resume: bool          # the session continues a run from its checkpoint
    step: int             # the step it starts from


# ---- TensorBoard ------------------------------------------------------------------------------
class TensorBoardTracker:
    """``run_dir/tb``: scalars under ``train/``, pictures under ``pictures/``, the config as a table."""
    name, id = "tensorboard", None

    def __init__(self, writer):
        self.writer = writer

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def pictures(self, paths: dict, step: int) -> None:
        for name, path in paths.items():
            with Image.open(path) as image:
                self.writer.add_image(f"pictures/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def summary(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str) -> None:
        self.writer.close()


def open_tensorboard(s: Start) -> TensorBoardTracker | None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional extra: selfsight[tensorboard]
    except ImportError:
        log.info("tensorboard is not installed (pip install 'selfsight[tensorboard]'): logging without tb/")
        return None
    # on resume, what a killed session logged after its checkpoint is hidden (the steps come again)
    writer = SummaryWriter(str(s.run_dir / "tb"), purge_step=s.step + 1 if s.resume else None)
    if not s.resume:
        table = "\n".join(f"| {k} | {v} |" for k, v in s.params.items())
        writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)
    return TensorBoardTracker(writer)


# ---- Weights & Biases -------------------------------------------------------------------------
class WandbTracker:
    """A W&B run: the rows as history, pictures as ``wandb.Image``, the summary as run summary."""
    name = "wandb"

    def __init__(self, run, image):
        self.run, self.image = run, image      # image: wandb.Image

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def pictures(self, paths: dict, step: int) -> None:
        self.run.log({f"pictures/{name}": self.image(str(path)) for name, path in paths.items()}, step=step)

    def summary(self, values: dict, step: int) -> None:
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


def open_wandb(s: Start) -> WandbTracker:
    """project = train.project, name = the run folder's, files under the run folder (or $WANDB_DIR);
    the mode (online, offline, disabled) is W&B's own: ``WANDB_MODE``. Quiet unless WANDB_QUIET or
    WANDB_SILENT says otherwise: the start lines (where the run is), not the closing summary."""
    import wandb  # optional extra: selfsight[wandb]
    quiet = {} if {"WANDB_QUIET", "WANDB_SILENT"} & os.environ.keys() else {"quiet": True}
    run = wandb.init(project=s.project, name=s.run_dir.name, id=s.run_id, resume="allow" if s.run_id else None,
                     dir=None if "WANDB_DIR" in os.environ else str(s.run_dir),
                     config=None if s.run_id else s.params, reinit="create_new", settings=wandb.Settings(**quiet))
    if s.run_id:                    # W&B's config may change on resume (e.g. a new budget)
        run.config.update(s.params, allow_val_change=True)
    return WandbTracker(run, wandb.Image)


# ---- MLflow -----------------------------------------------------------------------------------
class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (no global active run): the rows as metrics,
    pictures as artifacts under ``pictures/``, the summary as metrics."""
    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client, self.id = client, run_id

    def log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric  # optional extra: selfsight[mlflow]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):          # MLflow's limit per batch
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def pictures(self, paths: dict, step: int) -> None:
        for path in paths.values():
            self.client.log_artifact(self.id, str(path), "pictures")

    def summary(self, values: dict, step: int) -> None:
        self.log(values, step)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def open_mlflow(s: Start) -> MlflowTracker:
    """experiment = train.project, run name = the run folder's; the tracking URI is MLflow's own
    (``MLFLOW_TRACKING_URI`` or its default). Parameters are logged once: MLflow cannot change a
    parameter, so a resumed run adds only new keys; ``config.yaml`` (the config that runs) goes as an
    artifact every session."""
    from mlflow.entities import Param  # optional extra: selfsight[mlflow]
    from mlflow.tracking import MlflowClient
    client = MlflowClient()           # MLFLOW_TRACKING_URI or MLflow's default
    run_id = s.run_id if s.run_id and _mlflow_run_exists(client, s.run_id) else None
    if run_id:
        client.update_run(run_id, status="RUNNING")
        logged = client.get_run(run_id).data.params
    else:
        experiment = client.get_experiment_by_name(s.project)
        eid = experiment.experiment_id if experiment is not None else client.create_experiment(s.project)
        run_id, logged = client.create_run(eid, run_name=s.run_dir.name).info.run_id, {}
    new = [Param(k, str(v)) for k, v in s.params.items() if k not in logged]
    for i in range(0, len(new), 100):               # MLflow's limit per batch
        client.log_batch(run_id, params=new[i:i + 100])
    client.log_artifact(run_id, str(s.run_dir / "config.yaml"))
    return MlflowTracker(client, run_id)


def _mlflow_run_exists(client, run_id: str) -> bool:
    """Whether the run a checkpoint names is in this tracking store (another MLFLOW_TRACKING_URI
    on resume: a new MLflow run, with a warning)."""
    from mlflow.exceptions import MlflowException  # optional extra: selfsight[mlflow]
    try:
        client.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("mlflow: the run %s of this folder is not in %s: starting a new MLflow run", run_id,
                    client.tracking_uri)
        return False


# ---- metrics.csv ------------------------------------------------------------------------------
class CsvTracker:
    """``run_dir/metrics.csv``: one row per log step, a header of every key seen (a new key rewrites
    the file with the longer header; a resumed run appends under the header it finds)."""
    name, id = "csv", None

    def __init__(self, path: Path, file, keys: list):
        self.path, self.file, self.keys = path, file, keys

    def log(self, values: dict, step: int) -> None:
        row = {"step": step, **values}
        new = [k for k in row if k not in self.keys]
        if new:
            self._rewrite(self.keys + new)
        csv.DictWriter(self.file, self.keys).writerow(row)
        self.file.flush()

    def _rewrite(self, keys: list) -> None:
        self.file.close()
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f)) if self.keys else []
        text = io.StringIO()
        writer = csv.DictWriter(text, keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))
        self.keys, self.file = keys, open(self.path, "a", newline="")

    def pictures(self, paths: dict, step: int) -> None:
        pass

    def summary(self, values: dict, step: int) -> None:
        pass

    def close(self, status: str) -> None:
        self.file.close()


def open_csv(s: Start) -> CsvTracker:
    path = s.run_dir / "metrics.csv"
    keys = []
    if s.resume and path.exists():
        with open(path, newline="") as f:
            keys = next(csv.reader(f), [])
    return CsvTracker(path, open(path, "a" if s.resume else "w", newline=""), keys)


OPENERS = {"tensorboard": open_tensorboard, "wandb": open_wandb, "mlflow": open_mlflow, "csv": open_csv}


# ---- all of them ------------------------------------------------------------------------------
class Trackers:
    """The run's trackers behind one call each. A tracker whose call raises is dropped with one
    warning naming it and the error; training and the other trackers go on."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @property
    def ids(self) -> dict:
        """``{name: run id}`` of the trackers that have runs (W&B, MLflow), for the checkpoint."""
        return {t.name: t.id for t in self.trackers if t.id is not None}

    def log(self, values: dict, step: int) -> None:
        self._each("logging", lambda t: t.log(values, step))

    def pictures(self, paths: dict, step: int) -> None:
        if paths:
            self._each("logging pictures", lambda t: t.pictures(paths, step))

    def summary(self, values: dict, step: int) -> None:
        self._each("logging the summary", lambda t: t.summary(values, step))

    def close(self, status: str) -> None:
        """``status``: finished, stopped (by a signal, resumable) or failed."""
        self._each("closing", lambda t: t.close(status))
        self.trackers = []

    def _each(self, doing: str, call) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:      # a tracker never stops training
                self.trackers.remove(t)
                log.warning("train.loggers: %s failed while %s (%s: %s); the run goes on without it",
                            t.name, doing, type(e).__name__, first_line(e))


def first_line(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0].strip() if lines else type(e).__name__


def open_trackers(names: list[str], s: Start, ids: dict) -> Trackers:
    """Open the named trackers (``ids``: their runs from the checkpoint). One that cannot start
    (no login, a bad URI) stops the run before its first step in one line; those already opened are
    closed first."""
    opened = []
    for name in names:
        try:
            tracker = OPENERS[name](replace(s, run_id=ids.get(name)))
        except Exception as e:
            Trackers(opened).close("failed")
            raise TrainingError(f"train.loggers: {name} could not start ({first_line(e)}); "
                                f"leave it out of train.loggers to train without it") from e
        if tracker is not None:
            opened.append(tracker)
    return Trackers(opened)
