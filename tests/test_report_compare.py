"""``selfsight compare``: one row per run with its method, backbone, budget and images/s read from
the run folder, and the evaluation scores that ``selfsight eval ... --save`` kept in RUN/eval/."""
import json
import statistics

import pytest

from selfsight.cli import main
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_small):
    from helpers import tiny_overrides
    root = tmp_path_factory.mktemp("compare")
    made = {}
    for name, extra in (("simclr", {}), ("byol", {"method.name": "byol"})):
        made[name] = root / name
        pretrain(load_config(None, tiny_overrides(**{"train.steps": 2, "train.log_every": 1, **extra})), made[name],
                 dataset=fmnist_small)
    return made


def test_compare_prints_one_row_per_run_with_its_method(runs, capsys):
    assert main(["compare", str(runs["simclr"]), str(runs["byol"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run") and set(lines[1]) <= {"|", "-"}
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1], r[2]) for r in body] == [("simclr", "simclr", "resnet10"), ("byol", "byol", "resnet10")]
    assert all(r[3] == "fashion-mnist" for r in body)                                      # the training data
    assert all(r[4].startswith("2 steps / ") and r[6:] == ["-", "-", "-"] for r in body)   # no evaluation saved


def test_compare_json_reads_budget_and_images_per_second_from_the_log(runs, capsys):
    assert main(["compare", str(runs["simclr"]), str(runs["byol"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, name in zip(rows, ("simclr", "byol")):
        log = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert row["method"] == name and row["steps"] == 2 == log[-1]["step"]
        assert row["minutes"] == log[-1]["elapsed_min"] > 0
        assert row["images_per_s"] == statistics.median(r["images_per_s"] for r in log[1:]) > 0
        assert row["knn"] is None and row["linear"] is None and row["finetune"] is None


@pytest.fixture
def labeled_folder(tmp_path, fmnist_test):
    """120 real test images as PNGs in root/<class>/ folders."""
    from PIL import Image
    root = tmp_path / "images"
    for i in range(120):
        d = root / fmnist_test.classes[int(fmnist_test.labels[i])].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist_test.images[i, 0].numpy()).save(d / f"{i}.png")
    return root


def test_eval_save_feeds_the_knn_column(runs, capsys, labeled_folder):
    run = runs["simclr"]
    assert main(["eval", "knn", str(run), "--train", str(labeled_folder), "--test", str(labeled_folder),
                 "--k", "5", "--device", "cpu", "--json", "--save"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run / "eval" / "knn.json").read_text())
    assert saved["protocol"] == "knn" and saved["top1"] == res["top1"]
    assert main(["compare", str(run), str(runs["byol"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    simclr, byol = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    assert simclr[6] == f"{res['top1']:.4f} (images)" and byol[6] == "-"      # the score and its test data
    # a baseline's result is kept beside it and never shown as the run's score
    (run / "eval" / "linear_pixels.json").write_text(json.dumps({"model": "pixels", "top1": 0.8}))
    assert main(["compare", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["linear"] is None


def test_compare_refuses_a_missing_run_or_a_folder_that_is_not_one(runs, tmp_path, capsys):
    assert main(["compare", str(runs["simclr"]), str(tmp_path / "nothing")]) == 2
    assert "no run at" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a selfsight run" in capsys.readouterr().err
