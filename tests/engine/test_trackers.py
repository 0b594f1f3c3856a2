"""Experiment trackers (train.loggers) on real short runs: W&B (offline, read back from its run
files), MLflow (a local file store, read back with its client), metrics.csv and TensorBoard each get
the rows of metrics.jsonl at the same steps, the config, the pictures and the summary, and a
``--resume`` continues the same tracker run; a tracker that raises mid-run is dropped with one
warning while the run and the other trackers go on; a missing extra or a tracker that cannot
start is one line before training."""
import csv
import json
import logging
import struct
import sys
from pathlib import Path

import pytest
from helpers import tiny_overrides

from selfsight.engine import trackers
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config

# a tiny MAE: it has pictures (masks and reconstructions) to log at the end
MAE = {"method.name": "mae", "backbone.name": "vit_tiny", "backbone.patch_size": 7, "backbone.depth": 2,
       "method.head.decoder_dim": 64, "method.head.decoder_depth": 1, "method.head.decoder_heads": 2,
       "train.log_every": 2, "train.checkpoint_every": 0, "train.threads": 2}


def cfg(steps: int, loggers: str, **extra):
    return load_config(overrides=tiny_overrides(**{**MAE, "train.steps": steps, "train.loggers": loggers,
                                                   "train.tensorboard": "true", **extra}))


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """W&B offline and silent with every folder of its own under tmp_path; MLflow on a file store."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wb-cache", "WANDB_DATA_DIR": tmp_path / "wb-data",
                       "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict:
    """{key: {step: value}} of every number in metrics.jsonl."""
    out: dict = {}
    for row in jsonl(run):
        for k, v in trackers.scalars(row).items():
            out.setdefault(k, {})[row["step"]] = v
    return out


def wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header (":W&B", magic, version),
    then LevelDB-log chunks in 32 KiB blocks (crc32c, length, type: 1 full, 2 first, 3 middle,
    4 last) carrying ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 has no Python reader."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run(run: Path) -> dict:
    """Everything the W&B sessions of a run folder wrote: run ids, names, config, history, summary."""
    out = {"ids": set(), "names": set(), "config": {}, "history": {}, "summary": {}, "files": 0}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        out["files"] += 1
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["names"].add(r.run.display_name)
                out["project"] = r.run.project
                out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                row = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.history.item}
                for k, v in row.items():
                    out["history"].setdefault(k, {})[row["_step"]] = v
            elif kind == "summary":
                out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                       for u in r.summary.update})
    return out


def test_every_tracker_gets_the_rows_and_resume_continues_its_run(tracker_env, fmnist_small):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tracker_env / "run-a"
    loggers = "[wandb,mlflow,csv,tensorboard]"
    assert pretrain(cfg(4, loggers), run, dataset=fmnist_small)["steps"] == 4
    assert pretrain(cfg(8, loggers), run, resume=True, dataset=fmnist_small)["steps"] == 8   # a new budget
    want = expected(run)
    assert sorted(want["loss"]) == [2, 4, 6, 8]
    import torch
    ids = torch.load(run / "checkpoint.pt", weights_only=True)["meta"]["trackers"]
    assert set(ids) == {"wandb", "mlflow"}

    # W&B: one run (two sessions, two offline files), every row, the config flattened, pictures, summary
    wb = wandb_run(run)
    assert wb["files"] == 2 and wb["ids"] == {ids["wandb"]} and wb["names"] == {"run-a"}
    assert wb["project"] == "selfsight" and wb["config"]["optim.lr"] == pytest.approx(0.06)
    for key, steps in want.items():
        assert wb["history"][key] == steps, key
    assert {k for k in wb["history"] if k.startswith("pictures/")} and wb["summary"]["final/steps"] == 8

    # MLflow: the same run continued, every row, the config as parameters, artifacts, summary
    client = MlflowClient()
    mf = client.get_run(ids["mlflow"])
    assert mf.info.run_name == "run-a" and mf.info.status == "FINISHED"
    assert client.get_experiment(mf.info.experiment_id).name == "selfsight"
    assert len(client.search_runs([mf.info.experiment_id])) == 1
    assert mf.data.params["optim.lr"] == "0.06" and mf.data.params["train.steps"] == "4"   # logged once
    for key, steps in want.items():
        assert {m.step: m.value for m in client.get_metric_history(mf.info.run_id, key)} == \
            pytest.approx(steps, rel=1e-12), key
    assert [m.value for m in client.get_metric_history(mf.info.run_id, "final/steps")] == [4, 8]
    artifacts = {a.path for a in client.list_artifacts(mf.info.run_id)} | \
        {a.path for a in client.list_artifacts(mf.info.run_id, "pictures")}
    assert "config.yaml" in artifacts and any(p.endswith(".png") for p in artifacts)

    # metrics.csv: the same rows, appended on resume
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    for key, steps in want.items():
        assert {int(r["step"]): float(r[key]) for r in rows} == steps, key

    # TensorBoard: the same scalars under train/
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert {e.step: e.value for e in tb.Scalars("train/loss")} == pytest.approx(want["loss"], rel=1e-6)
    assert any(t.startswith("pictures/") for t in tb.Tags()["images"])


def test_a_tracker_that_raises_mid_run_is_dropped_and_the_run_goes_on(tracker_env, fmnist_small, monkeypatch,
                                                                        caplog):
    from mlflow.tracking import MlflowClient
    calls = {"n": 0}
    real = trackers.CsvTracker.log

    def flaky(self, values, step):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(self, values, step)
    monkeypatch.setattr(trackers.CsvTracker, "log", flaky)
    run = tracker_env / "run-b"
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        assert pretrain(cfg(8, "[csv,mlflow]"), run, dataset=fmnist_small)["steps"] == 8
    warned = [r.getMessage() for r in caplog.records if "train.loggers" in r.getMessage()]
    assert len(warned) == 1 and "csv failed" in warned[0] and "No space left on device" in warned[0], warned
    assert calls["n"] == 2                                                       # dropped: not called again
    assert len((run / "metrics.csv").read_text().splitlines()) == 2              # header and the first row
    want = expected(run)
    client = MlflowClient()
    (mf,) = client.search_runs([client.get_experiment_by_name("selfsight").experiment_id])
    assert mf.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(mf.info.run_id, "loss")} == \
        pytest.approx(want["loss"], rel=1e-12)


def test_csv_header_grows_with_new_keys_and_resume_appends(tmp_path):
    start = trackers.Start(tmp_path, "p", {}, None, False, 0)
    t = trackers.open_csv(start)
    t.log({"loss": 1.5}, 1)
    t.log({"loss": 1.25, "top1": 0.5}, 2)            # a new key: the file is rewritten with it
    t.close("finished")
    t = trackers.open_csv(trackers.Start(tmp_path, "p", {}, None, True, 2))
    t.log({"loss": 1.0, "top1": 0.75}, 3)
    t.log({"loss": 0.5, "rankme": 3.0}, 4)
    t.close("finished")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "loss", "top1", "rankme"], ["1", "1.5", "", ""], ["2", "1.25", "0.5", ""],
                    ["3", "1.0", "0.75", ""], ["4", "0.5", "", "3.0"]]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_before_training(tmp_path, monkeypatch, capsys, name):
    from selfsight.cli import main
    monkeypatch.setitem(sys.modules, name, None)          # import NAME raises ImportError
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--steps", "2", f"train.loggers=[{name},csv]",
                 *tiny_overrides()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"selfsight: error: train.loggers names {name}, which is not installed: "
                   f"pip install 'selfsight[{name}]'"]
    assert not run.exists()


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_folder(tracker_env, monkeypatch, capsys):
    from selfsight.cli import main
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    run = tracker_env / "run-c"
    assert main(["pretrain", "--out", str(run), "--steps", "2", "train.loggers=[csv,mlflow]",
                 *tiny_overrides()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfsight: error: train.loggers: mlflow could not start ("), err
    assert err[0].endswith("leave it out of train.loggers to train without it")
    assert not run.exists()


def test_mlflow_on_its_default_sqlite_store_without_sqlalchemy_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    from selfsight.cli import main
    if importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("SQLAlchemy is installed: MLflow's SQLite store works")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--steps", "2", "train.loggers=[mlflow]", *tiny_overrides()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs SQLAlchemy: pip install mlflow" in err[0] and "MLFLOW_TRACKING_URI" in err[0], err
    assert not run.exists()


def test_only_the_main_process_opens_trackers(tmp_path, monkeypatch):
    import torch

    import selfsight.engine.logs as logs
    monkeypatch.setattr(logs, "is_main", lambda: False)
    runlog = logs.RunLog(cfg(2, "[csv,tensorboard]"), tmp_path / "run", None, torch.device("cpu"), 1)
    assert runlog.open(True, {"wandb": "abc"}, 4) == {"wandb": "abc"}      # the ids pass through, kept
    runlog.write({"step": 1, "loss": 1.0})
    runlog.close()
    assert not (tmp_path / "run").exists()


def _failing_start_worker(rank, run_dir, dataset):
    from selfsight.engine.trainer import Trainer, TrainingError
    config = load_config(overrides=tiny_overrides(**{"train.steps": 2, "train.loggers": "[mlflow]"}))
    try:
        Trainer(config, run_dir, dataset=dataset).fit()
    except TrainingError as e:
        return {"error": str(e)}
    return {"error": None}


def test_a_tracker_that_cannot_start_stops_every_process(tracker_env, monkeypatch, fmnist_small):
    """The tracker opens on the main process only; the others learn of its failure instead of
    waiting in the first step's all-reduce."""
    from helpers import run_on_gloo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    (tracker_env / "gloo").mkdir()
    out = run_on_gloo(_failing_start_worker, tracker_env / "gloo", tracker_env / "run-d", fmnist_small,
                      writes=[tracker_env / "run-d"])
    assert out["error"].startswith("train.loggers: mlflow could not start")
    assert not (tracker_env / "run-d").exists()
