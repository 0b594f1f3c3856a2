"""Progress of the long waits (selfsight/progress.py): a bar on a terminal, elsewhere a line with
the count, rate and time left every PERIOD seconds; feature extraction and training report it, and
non-interactive output carries no bar (no carriage returns)."""
import logging

import pytest
from helpers import tiny_overrides

import selfsight.progress as progress
from selfsight.backbones.features import backbone_features
from selfsight.data import ArrayDataset
from selfsight.engine.trainer import Trainer
from selfsight.eval.features import extract
from selfsight.progress import Progress
from selfsight.resolve import load_config
from selfsight.runs import load_run


def test_a_line_names_count_rate_time_left_and_the_postfix(caplog):
    caplog.set_level(logging.INFO, "selfsight")
    with Progress(200, "features of the test data", period=0.0) as bar:
        bar.set_postfix(loss="1.2345")
        bar.update(50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("features of the test data: 50/200 images (25 %), ")
    assert "images/s, ~" in lines[0] and lines[0].endswith("left, loss 1.2345")
    assert lines[-1].startswith("features of the test data: 50 images in ")


def test_switched_off_it_says_nothing(caplog, monkeypatch):
    caplog.set_level(logging.INFO, "selfsight")
    monkeypatch.setenv("SELFSIGHT_PROGRESS", "0")
    with Progress(10, "x", period=0.0) as bar:
        bar.update(10)
    assert not caplog.records


def test_feature_extraction_reports_progress(caplog, monkeypatch, fmnist_small, tmp_path):
    caplog.set_level(logging.INFO, "selfsight")
    monkeypatch.setattr(progress, "PERIOD", 0.0)
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 1}))
    Trainer(cfg, tmp_path / "run", dataset=fmnist_small).fit()
    model, _, pre = load_run(tmp_path / "run", "cpu")
    data = ArrayDataset(fmnist_small.images[:256], fmnist_small.labels[:256])
    extract(backbone_features(model.backbone), data, pre, "cpu", 64, desc="features of the bank")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features of the bank")]
    assert [x.split(" images")[0] for x in lines[:4]] == [f"features of the bank: {n}/256" for n in (64, 128, 192, 256)]
    assert all("~" in x and "left" in x for x in lines[:4])


@pytest.mark.parametrize("on", [True, False])
def test_training_off_a_terminal_logs_lines_not_a_bar(caplog, capsys, monkeypatch, fmnist_small, tmp_path, on):
    caplog.set_level(logging.INFO, "selfsight")
    monkeypatch.setattr(progress, "TRAINING_PERIOD", 0.0)
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 3, "train.progress": str(on).lower(),
                                                  "train.log_every": 1}))
    Trainer(cfg, tmp_path / "run", dataset=fmnist_small).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training: ")]
    err = capsys.readouterr().err
    assert "\r" not in err
    if on:
        assert lines[0].startswith("training: 1/3 steps (33 %), ") and "loss" in lines[1] and "left" in lines[1]
    else:
        assert lines == []
