"""What a new user meets in the first hour, through the command line (issue 21): evaluation classes
matched by name, strict --resume and a new budget on resume, the view size chosen from the images,
export file names, settings anywhere on the line, clear errors, exit codes, help and progress."""
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from PIL import Image

from selfsight.cli import main

PY = [sys.executable, "-m", "selfsight"]
NAMES = {5: "Sandal", 7: "Sneaker", 8: "Bag", 9: "Ankle boot"}      # Fashion-MNIST classes used as folders


def write_folder(root: Path, dataset, classes, per_class: int, start: int = 0, size: int | None = None) -> Path:
    """``per_class`` real Fashion-MNIST images of each class as ``root/<class name>/i.png``."""
    for c in classes:
        idx = torch.nonzero(dataset.labels == c).flatten()[start:start + per_class]
        (root / NAMES[c]).mkdir(parents=True, exist_ok=True)
        for i in idx.tolist():
            img = Image.fromarray(dataset.images[i, 0].numpy())
            (img.resize((size, size)) if size else img).save(root / NAMES[c] / f"{i}.png")
    return root


def tiny(**extra) -> list[str]:
    return tiny_overrides(**{"train.log_every": 1, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_small):
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    run = tmp_path_factory.mktemp("first-hour") / "run"
    pretrain(load_config(None, tiny(**{"train.steps": 3})), run, dataset=fmnist_small)
    return run


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fmnist, fmnist_test):
    root = tmp_path_factory.mktemp("folders")
    train = write_folder(root / "train", fmnist, (5, 7, 8), 40)
    test = write_folder(root / "test", fmnist_test, (5, 7, 8), 20)
    shifted = write_folder(root / "shifted", fmnist_test, (5, 7, 8), 20)
    write_folder(root / "shifted", fmnist_test, (9,), 10)                  # "Ankle boot" sorts first: every index moves
    return {"train": train, "test": test, "shifted": shifted}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---- 1. classes matched by name -----------------------------------------------------------------
def test_knn_matches_classes_by_name_not_position(trained, folders, capsys):
    args = ["eval", "knn", str(trained), "--train", str(folders["train"]), "--k", "5", "--device", "cpu"]
    assert main(args + ["--test", str(folders["test"]), "--json"]) == 0
    aligned = last_json(capsys.readouterr().out)
    assert aligned["classes"] == ["Bag", "Sandal", "Sneaker"] and aligned["matched_by"] == "name"
    # a test class the training data lacks: one line by default, nothing scored
    assert main(args + ["--test", str(folders["shifted"])]) == 2
    err = capsys.readouterr().err
    assert "Ankle boot" in err and "--unknown-classes wrong" in err and err.count("\n") == 1
    # scored as wrong when asked: the known images score exactly as in the aligned pair
    assert main(args + ["--test", str(folders["shifted"]), "--unknown-classes", "wrong", "--json"]) == 0
    shifted = last_json(capsys.readouterr().out)
    assert shifted["unknown_classes"] == {"Ankle boot": 10}
    assert round(shifted["top1"] * 70) == round(aligned["top1"] * 60) > 30         # images counted right
    assert round(shifted["top5"] * 70) == round(aligned["top5"] * 60)
    assert main(args + ["--test", str(folders["shifted"]), "--unknown-classes", "wrong"]) == 0
    line = capsys.readouterr().out
    assert "scored on 3 classes by name: Bag, Sandal, Sneaker" in line and "Ankle boot (10 images)" in line


def test_a_shuffled_class_order_scores_as_the_aligned_one(trained, fmnist, fmnist_test):
    """The same real test images with their classes listed in another order (labels permuted with
    them) give the same kNN, linear-probe and fine-tune accuracy as the aligned order."""
    from selfsight.data import ArrayDataset
    from selfsight.data.builtin import FASHION_CLASSES
    from selfsight.eval.finetune import finetune
    from selfsight.eval.knn import evaluate_knn
    from selfsight.eval.linear import evaluate_linear
    train = ArrayDataset(fmnist.images[:600].clone(), fmnist.labels[:600].clone(), "train", FASHION_CLASSES)
    test = ArrayDataset(fmnist_test.images[:300].clone(), fmnist_test.labels[:300].clone(), "test", FASHION_CLASSES)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))          # new position of class c
    shuffled_names = [None] * 10
    for c in range(10):
        shuffled_names[int(perm[c])] = FASHION_CLASSES[c]
    shuffled = ArrayDataset(test.images, perm[test.labels], "test-shuffled", shuffled_names)
    assert not torch.equal(shuffled.labels, test.labels)
    a = evaluate_knn(str(trained), train, test, k=5, device="cpu")
    b = evaluate_knn(str(trained), train, shuffled, k=5, device="cpu")
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"]) and a["top1"] > 0.3
    a = evaluate_linear(str(trained), train, test, device="cpu", epochs=3)
    b = evaluate_linear(str(trained), train, shuffled, device="cpu", epochs=3)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    a = finetune(str(trained), train, test, epochs=1, batch_size=128, device="cpu", workers=0)
    b = finetune(str(trained), train, shuffled, epochs=1, batch_size=128, device="cpu", workers=0)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


# ---- 2 and 3. --resume ---------------------------------------------------------------------------
def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "nosuchrun"), "--resume", "--steps", "2", *tiny()]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "does not exist" in err and not (tmp_path / "nosuchrun").exists()
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("train: {steps: 3}\n")            # stopped before a checkpoint
    assert main(["pretrain", "--out", str(tmp_path / "early"), "--resume", *tiny()]) == 2
    assert "before its first checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "early" / "checkpoint.pt").exists()


def test_a_new_budget_given_with_resume_applies_and_config_yaml_records_it(tmp_path, capsys):
    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    run = tmp_path / "run"                          # on fashion-mnist: the CLI rebuilds the same data
    trainer = Trainer(load_config(None, tiny(**{"train.steps": 150})), run)
    step = trainer._step

    def interrupt_at_9(batch, sched, window):       # as Ctrl-C during step 9
        step(batch, sched, window)
        if sched["step"] == 8:
            trainer._stop_signal = signal.SIGINT
    trainer._step = interrupt_at_9
    assert trainer.fit()["steps"] == 9
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "5"]) == 2
    assert "used up" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "14"]) == 0
    assert last_json(capsys.readouterr().out)["steps"] == 14
    from selfsight.config import read_yaml
    assert read_yaml(run / "config.yaml")["train"]["steps"] == 14
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 14 and ck["total_steps"] == 14 and ck["config"]["train"]["steps"] == 14
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    # the schedules were replanned: from step 9 on the lr is the cosine of a 14-step run
    fresh = Trainer(load_config(None, tiny(**{"train.steps": 14})), tmp_path / "fresh")
    for r in rows[9:]:
        assert r["lr"] == pytest.approx(fresh.schedule(r["step"] - 1)["lr"])
    # a time budget on resume replaces the step budget (not both at once)
    assert main(["pretrain", "--out", str(run), "--resume", "--minutes", "0.1"]) == 0
    cfg = read_yaml(run / "config.yaml")["train"]
    assert (cfg["steps"], cfg["minutes"]) == (0, 0.1)


# ---- 4. the view size and stem from the images ------------------------------------------------------
def test_auto_picks_small_views_for_small_images_and_imagenet_for_photos(tmp_path, fmnist, caplog):
    small = write_folder(tmp_path / "small", fmnist, (5, 7), 8, size=40)
    skimage = pytest.importorskip("skimage.data")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage, name)()).save(photos / f"{name}.jpg")
    # width 16: torch 2.14's channels-last CPU backward of resnet10 at width 8 and 224 px crashes (double free)
    auto = {"backbone.small_stem": "auto", "views.size": 0, "data.batch_size": 4, "data.workers": 0,
            "backbone.width": 16}
    caplog.set_level(logging.INFO, logger="selfsight")
    for folder, size, stem, seen in ((small, 32, "cifar", "median 40 px"), (photos, 224, "ImageNet", "short side 300-512 px")):
        caplog.clear()
        out = tmp_path / f"run-{folder.name}"
        assert main(["pretrain", "--data", str(folder), "--out", str(out), "--steps", "1", *tiny(**auto)]) == 0
        line = next(r.message for r in caplog.records if r.message.startswith("views:"))
        preset = "small" if size == 32 else "imagenet"
        assert f"preset {preset} at {size} px, resnet10 with the {stem} stem" in line and "views.preset=auto" in line
        assert seen in line, line
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ck["meta"]["preprocess"]["size"] == size


def test_auto_view_sizes():
    from selfsight.augment.views import auto_views
    assert [auto_views(s) for s in (28, 32, 40, 64, 96, 150, 224, 1024)] == [
        ("small", 32), ("small", 32), ("small", 32), ("small", 64), ("imagenet", 96), ("imagenet", 160),
        ("imagenet", 224), ("imagenet", 224)]


# ---- 5 and 9. export file names ---------------------------------------------------------------------
def test_export_writes_what_the_file_name_says(trained, tmp_path, capsys):
    from selfsight.deploy import load_backbone, torchvision_model
    from selfsight.deploy.backbone import read_metadata
    from selfsight.runs import load_run
    pt = tmp_path / "model.pt"
    assert main(["export", str(trained), "--out", str(pt), "--format", "torchvision"]) == 0
    assert "torch.load" in capsys.readouterr().out
    net = torchvision_model(read_metadata(pt))
    net.load_state_dict(torch.load(pt, weights_only=True), strict=True)             # a real torch state dict
    x = torch.randn(2, 1, 28, 28)
    ref = load_run(trained)[0].backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref(x))
        back, _ = load_backbone(pt)
        torch.testing.assert_close(back(x), ref(x))
    for out, fmt in (("m.safetensors", "onnx"), ("m.bin", "torchvision"), ("m.onnx", "safetensors")):
        assert main(["export", str(trained), "--out", str(tmp_path / out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "name the file" in err and not (tmp_path / out).exists()


def test_onnx_export_says_how_to_run_it(trained, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(trained), "--out", str(onnx), "--format", "onnx"]) == 0
    assert "onnxruntime.InferenceSession" in capsys.readouterr().out
    from selfsight.deploy import load_backbone
    with pytest.raises(ValueError, match="onnxruntime"):
        load_backbone(onnx)


def test_files_follow_the_umask_like_any_new_file(trained, tmp_path):
    from selfsight.deploy import export
    from selfsight.files import new_file_mode
    export(trained, tmp_path / "a.safetensors")
    export(trained, tmp_path / "b.pt", "torchvision")
    for path in (trained / "checkpoint.pt", tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "b.pt.json"):
        assert path.stat().st_mode & 0o777 == new_file_mode(), path


# ---- 6, 7, 8, 10 and the rough edges -------------------------------------------------------------
def test_settings_are_accepted_anywhere_on_the_line(tmp_path, capsys):
    out = tmp_path / "r"
    rest = [x for x in tiny() if not x.startswith(("data.batch_size=", "optim.lr="))]
    argv = ["pretrain", "data.batch_size=16", "--out", str(out), "optim.lr=0.1", "--steps", "1", *rest]
    assert main(argv) == 0
    from selfsight.config import read_yaml
    cfg = read_yaml(out / "config.yaml")
    assert cfg["data"]["batch_size"] == 16 and cfg["optim"]["lr"] == 0.1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(out), "--stpes", "2"])
    assert "unknown option --stpes; did you mean --steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):             # a misspelled required option: named, not "--train is required"
        main(["eval", "seg", str(out), "--trian", "fashion-mnist-scenes", "--test", "fashion-mnist-scenes:test"])
    assert "unknown option --trian; did you mean --train?" in capsys.readouterr().err


def test_a_file_of_random_bytes_is_named_corrupt_not_dangerous(tmp_path, capsys):
    junk = tmp_path / "checkpoint.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    assert main(["eval", "knn", str(junk), "--train", "fashion-mnist", "--test", "fashion-mnist:test"]) == 2
    err = capsys.readouterr().err
    assert "not a torch checkpoint (corrupt, or a file of another kind)" in err and "could run code" not in err


def test_a_folder_of_unreadable_files_is_one_line_and_leaves_no_run(tmp_path):
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    for i in range(5):
        (bad / f"{i}.jpg").write_bytes(np.random.default_rng(i).bytes(200))
    out = tmp_path / "run"
    p = subprocess.run([*PY, "pretrain", "--data", str(tmp_path / "bad"), "--out", str(out), "--steps", "2", *tiny()],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("selfsight: error: no readable image in")
    assert not out.exists()


def test_a_run_failing_before_its_first_step_leaves_no_folder(tmp_path, fmnist_small, monkeypatch):
    from selfsight.engine import trainer as tr
    from selfsight.resolve import load_config
    monkeypatch.setattr(tr.Trainer, "_step", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tr.pretrain(load_config(None, tiny(**{"train.steps": 2})), tmp_path / "run", dataset=fmnist_small)
    assert not (tmp_path / "run").exists()


def test_selfsight_alone_lists_the_commands_and_help_needs_no_torch(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "pretrain " in out and "neighbors " in out and "selfsight demo" in out and "pytest" in out
    code = ("import sys\nfrom selfsight.cli import main\ntry:\n    main(['pretrain', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "budget is needed" in p.stdout
    code = ("import sys\nfrom selfsight.cli import main\nrc = main(['pretrain', '--out', 'r', 'views.size=-3'])\n"
            "assert rc == 2 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and "'views.size' must be >= 0" in p.stderr, p.stderr     # a bad key fails without torch


def test_every_option_has_help():
    import argparse

    from selfsight.cli import build_parser

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, p in a.choices.items():
                    yield from walk(p, f"{path} {name}")
            elif not isinstance(a, argparse._HelpAction) and a.dest != "version":
                yield path, a
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in walk(build_parser(), "selfsight") if not a.help]
    assert missing == []


def test_extraction_reports_progress_without_a_terminal(trained, fmnist_small, caplog, monkeypatch):
    from selfsight import progress
    from selfsight.backbones.features import backbone_features
    from selfsight.eval.features import extract
    from selfsight.runs import load_run
    monkeypatch.setattr(progress, "PERIOD", 0.0)          # a line every batch (stderr is no terminal here)
    model, _, pre = load_run(trained)
    caplog.set_level(logging.INFO, logger="selfsight")
    extract(backbone_features(model.backbone), fmnist_small, pre, batch_size=512, desc="features of the bank")
    lines = [r.message for r in caplog.records if r.message.startswith("features of the bank")]
    assert any("512/2048 images (25 %)" in x and "left" in x for x in lines) and len(lines) >= 4


def test_pictures_and_embed_say_when_they_replace_earlier_output(trained, folders, tmp_path, caplog):
    from selfsight.deploy import embed
    from selfsight.viz.pictures import write_pictures
    caplog.set_level(logging.INFO)
    write_pictures(trained, str(folders["test"]), tmp_path / "pics", n=16)
    assert "replaced" not in caplog.text
    write_pictures(trained, str(folders["test"]), tmp_path / "pics", n=16)
    assert "replaced 11 earlier pictures" in caplog.text
    caplog.clear()
    embed(trained, folders["test"], tmp_path / "e.npy", workers=0, progress=False)
    assert "replaced" not in caplog.text
    embed(trained, folders["test"], tmp_path / "e.npy", workers=0, progress=False)
    assert "will be replaced" in caplog.text
