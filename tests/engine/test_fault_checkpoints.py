"""Checkpoints under faults: a failed write (disk full) keeps the previous checkpoint and stops the
run with one line; a file carrying a pickled code payload is refused everywhere selfsight loads
files, and the payload never runs; a checkpoint of another method, backbone, width or a newer
format version is refused with one line naming what differs, not a key/shape traceback."""
import errno
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from selfsight import files as ckpt
from selfsight.engine.trainer import Trainer, TrainingError, pretrain
from selfsight.files import CheckpointError, atomic_save, load_model_state, safe_load
from selfsight.resolve import load_config

ROOT = Path(__file__).resolve().parents[2] / "selfsight"


class Payload:
    """Unpickling this runs ``exec``: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def tiny(**extra):
    return load_config(overrides=tiny_overrides(**{"train.steps": 6, "train.checkpoint_every": 3, **extra}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_small) -> Path:
    """A 3-step SimCLR run (resnet10, width 8); tests take a copy of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    pretrain(tiny(**{"train.steps": 3}), run, dataset=fmnist_small)
    return run


def copy_of(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, fmnist_small, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):            # the second write runs out of space half-way
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        pretrain(tiny(), run, dataset=fmnist_small)
    msg = one_line(e)
    assert "No space left on device" in msg and "at step 6" in msg and "previous checkpoint (step 3) is intact" in msg
    assert safe_load(run / "checkpoint.pt")["step"] == 3            # still loads, still step 3
    assert not list(run.glob(".checkpoint.pt.*"))                    # the torn temporary file is gone
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert pretrain(tiny(), run, resume=True, dataset=fmnist_small)["steps"] == 6   # and the run resumes from it


def test_unwritable_output_is_one_cli_line(tmp_path, capsys):
    from selfsight.cli import main
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["pretrain", "--data", "fashion-mnist", "--steps", "2", "--out", str(blocker / "run"),
               *tiny_overrides()])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("selfsight: error:") and "a-file" in err[0], err


def test_code_payload_is_refused_everywhere_and_never_runs(tmp_path, fmnist_small, trained):
    from selfsight.runs import load_run
    from selfsight.targets.features import load_teacher
    from selfsight.tokenizers import load_tokenizer
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {"w": torch.zeros(2)}, "meta": Payload(marker)}, evil)
    loaders = {"safe_load": lambda: safe_load(evil), "load_run": lambda: load_run(evil),
               "load_tokenizer": lambda: load_tokenizer(evil),
               "teacher weights": lambda: load_teacher("timm:vit_tiny_patch16_224", str(evil))}
    for name, load in loaders.items():
        with pytest.raises(CheckpointError) as e:
            load()
        assert "refusing to load" in one_line(e) and "could run code" in str(e.value), name
    run = copy_of(trained, tmp_path)                          # a run folder whose checkpoint was swapped
    evil.replace(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        pretrain(tiny(), run, resume=True, dataset=fmnist_small)
    assert not marker.exists(), "the payload ran"


def test_every_torch_load_in_the_library_is_weights_only():
    calls = []
    for f in ROOT.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            calls.append((f.relative_to(ROOT), m.group(1)))
    assert calls                                              # the scan sees the loaders
    assert all("weights_only=True" in args for _, args in calls), calls


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    good = tmp_path / "c.pt"
    atomic_save({"format_version": 1, "x": torch.randn(1000)}, good)
    data = good.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 30):
        (tmp_path / "t.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            safe_load(tmp_path / "t.pt")
        assert "cannot read" in one_line(e)


@pytest.mark.parametrize("change, expect", [
    ({"method.name": "mocov2", "method.queue_size": 64, "method.temperature": 0.2}, "simclr/resnet10 run"),
    ({"backbone.name": "resnet18"}, "simclr/resnet10 run"),
    ({"backbone.width": 16}, "shape mismatches"),              # same names, other shapes
])
def test_checkpoint_of_another_method_or_backbone_is_refused_in_one_line(tmp_path, fmnist_small, trained, change,
                                                                         expect):
    run = copy_of(trained, tmp_path)
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny(**change), run, resume=True, dataset=fmnist_small)
    assert expect in one_line(e)


def test_hand_edited_checkpoints_are_refused_in_one_line(tmp_path, fmnist_small, trained):
    run = copy_of(trained, tmp_path)
    ck = safe_load(run / "checkpoint.pt")
    model = Trainer(tiny(), tmp_path / "other", dataset=fmnist_small).model
    edited = dict(ck["model"])
    edited["projector.extra.weight"] = edited.pop(next(k for k in edited if k.startswith("projector.")))
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, edited, "edited.pt")
    msg = one_line(e)
    assert "missing keys 1" in msg and "unexpected keys 1 (e.g. projector.extra.weight)" in msg
    torch.save({**ck, "model": edited}, run / "checkpoint.pt")       # the trainer says the same on resume
    with pytest.raises(CheckpointError, match="missing keys 1"):
        pretrain(tiny(), run, resume=True, dataset=fmnist_small)
    torch.save({**ck, "format_version": ckpt.FORMAT_VERSION + 1}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny(), run, resume=True, dataset=fmnist_small)
    assert f"format version {ckpt.FORMAT_VERSION + 1}" in one_line(e) and "upgrade selfsight" in str(e.value)


def test_tokenizer_artifact_with_other_shapes_is_refused(tmp_path):
    import selfsight.tokenizers  # noqa: F401  (registers the kinds)
    from selfsight.tokenizers import TOKENIZERS, load_tokenizer, save_tokenizer
    config = {"channels": 1, "vocab_size": 16, "dim": 8, "hidden": 8, "downsample": 4}
    tok = TOKENIZERS.get("vq")(config)
    path = tmp_path / "tokenizer.pt"
    save_tokenizer(tok, "vq", {**config, "vocab_size": 32}, {"size": 28, "mean": [0.5], "std": [0.5]}, path)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(path)
    assert "shape mismatches" in one_line(e)
