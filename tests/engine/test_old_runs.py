"""A run folder written before the restructure of the engine, the config and the evaluation (by
selfsight at commit f8a0527: a 3-step MoCo v2 run of a width-4 resnet10 on Fashion-MNIST, kept in
``old_run/``) still loads, evaluates, exports and resumes with the code of today."""
import json
import shutil
from pathlib import Path

import torch

from selfsight.cli import main
from selfsight.files import safe_load
from selfsight.runs import load_run

OLD = Path(__file__).with_name("old_run")


def test_an_old_run_loads_evaluates_and_resumes(tmp_path, capsys, fmnist_small, fmnist_test):
    run = Path(shutil.copytree(OLD, tmp_path / "old"))
    model, cfg, pre = load_run(run)
    assert (cfg.method.name, cfg.backbone.name, cfg.backbone.small_stem, pre["size"]) == ("mocov2", "resnet10", "s2", 28)
    ck = safe_load(run / "checkpoint.pt")
    for k, v in ck["model"].items():                            # the weights are the file's
        torch.testing.assert_close(model.state_dict()[k], v)
    from selfsight.data import ArrayDataset
    from selfsight.eval.knn import evaluate_knn
    bank = ArrayDataset(fmnist_small.images[:512].clone(), fmnist_small.labels[:512].clone())
    test = ArrayDataset(fmnist_test.images[:128].clone(), fmnist_test.labels[:128].clone())
    res = evaluate_knn(str(run), bank, test, k=5, device="cpu")
    assert 0.2 < res["top1"] <= 1
    assert main(["export", str(run), "--out", str(tmp_path / "old.safetensors")]) == 0
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "5", "train.threads=1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 5 and safe_load(run / "checkpoint.pt")["step"] == 5
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5
