"""The command line: version, methods, errors as one line, pretrain on a folder, eval knn --json, torchrun."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers import tiny_overrides

PY = [sys.executable, "-m", "selfsight"]


def run(*args, check=True):
    p = subprocess.run([*PY, *args], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_version_and_methods():
    assert run("--version").stdout.startswith("selfsight ")
    out = run("methods").stdout
    assert "simclr" in out and "resnet18" in out and "vit_small" in out and "simclr_fashion_mnist" in out


def test_export_format_choices_are_the_exporters():
    """The parser lists the formats itself (importing the exporter would load torch for --help)."""
    import argparse
    from selfsight.cli import build_parser
    from selfsight.deploy.backbone import FORMATS
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fmt = next(a for a in sub.choices["export"]._actions if a.dest == "format")
    assert tuple(fmt.choices) == FORMATS


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    p = run("pretrain", "--out", str(tmp_path / "r"), "--steps", "1", "optim.learnig_rate=1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'optim.learnig_rate'" in p.stderr and "did you mean" in p.stderr
    p = run("eval", "knn", str(tmp_path / "missing"), "--train", "fashion-mnist", "--test", "fashion-mnist:test",
            check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr


def test_pretrain_on_a_folder_then_knn_json(tmp_path, fmnist_small):
    folder = tmp_path / "imgs"
    for i in range(96):                      # a labeled folder of real PNGs: root/<class>/...
        cls = folder / f"class_{int(fmnist_small.labels[i])}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(cls / f"{i}.png")
    (folder / "class_0" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    p = run("pretrain", "--method", "simclr", "--data", str(folder), "--out", str(out), "--steps", "3",
            *tiny_overrides(**{"views.preset": "small", "data.workers": 1}))
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] == 3
    res = run("eval", "knn", str(out), "--train", str(folder), "--test", str(folder), "--k", "5", "--json")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.0 <= row["top1"] <= 1.0 and row["top5"] >= row["top1"] and row["feature_dim"] == 64
    base = json.loads(run("eval", "knn", str(out), "--train", str(folder), "--test", str(folder), "--baseline",
                          "pixels", "--json").stdout.strip().splitlines()[-1])
    assert base["top1"] == pytest.approx(1.0)                     # each test image is in the bank


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "selfsight",
           "pretrain", "--out", str(out), "--steps", "4", *tiny_overrides(**{"train.checkpoint_every": 2})]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # gloo's TCP transport once aborted a worker at start-up on a loaded 2-core CI machine (no Python
        # error, never reproduced in 18 local runs, also under load): one fresh try, a real bug fails it again
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-6000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["meta"]["world_size"] == 2
    assert any("running_mean" in k for k in ck["model"])           # global BN buffers saved
