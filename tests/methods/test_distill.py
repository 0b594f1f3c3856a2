"""Distillation from a frozen teacher (methods/distill.py) on real Fashion-MNIST images: the loss is 0
when the student equals the teacher and no gradient reaches the teacher; the dense term resizes the
student's grid to the teacher's; the teacher's input is the student's view in the teacher's own
channels, size and normalisation; every kind of teacher loads (a run, an export, timm:NAME with a
local file) or is refused in one line; the feature cache (memory and disk) returns what the teacher
computes and is refused for random views; 2 gloo processes equal 1 process (float64)."""
import copy
from pathlib import Path

import pytest
import timm
import torch
from helpers import run_on_gloo
from safetensors.torch import save_file

from selfsight.augment import ViewRecipe
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.deploy.backbone import export
from selfsight.methods.distill import Distill, DistillParams, distill_loss, grid_of, resize_tokens
from selfsight.nn.distributed import gather_no_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

OLD_RUN = str(Path(__file__).parents[1] / "engine" / "old_run")      # a MoCo v2 resnet10 (width 4) on 28 px gray
FIXED = ViewRecipe(size=28, n_views=1, crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                   mean=(0.5,), std=(0.5,))
RANDOM = ViewRecipe(size=28, n_views=1, crop_scale=(0.5, 1.0), mean=(0.5,), std=(0.5,))


def images(fmnist_small, n=16):
    return (fmnist_small.images[:n].float() / 255 - 0.5) / 0.5                 # normalised as FIXED


def student(width=8):
    torch.manual_seed(0)
    return ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=width)


def test_loss_is_zero_for_the_teacher_itself_and_grows_away_from_it():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, 8, generator=g)
    for kind in ("cosine", "mse"):
        same = t if kind == "cosine" else torch.nn.functional.layer_norm(t, (8,), eps=1e-6)
        assert distill_loss(same, t, kind).item() == pytest.approx(0.0, abs=1e-6)
        assert distill_loss(same + 0.5 * torch.randn(6, 5, 8, generator=g), t, kind) > 0.01
    assert distill_loss(2 * t, t, "cosine").item() == pytest.approx(0.0, abs=1e-6)      # cosine: scale-free
    with pytest.raises(ValueError, match="cosine or mse"):
        distill_loss(t, t, "l1")


def test_grids_and_token_resizing():
    assert grid_of(16, 28, 28) == (4, 4) and grid_of(8, 14, 28) == (2, 4) and grid_of(1, 28, 28) == (1, 1)
    with pytest.raises(ValueError, match="cannot lay 7 tokens"):
        grid_of(7, 28, 28)
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)            # B×(2·2)×D
    assert resize_tokens(x, (2, 2), (2, 2)) is x
    up = resize_tokens(x, (2, 2), (4, 4))
    assert up.shape == (2, 16, 3)
    torch.testing.assert_close(up.mean(1), x.mean(1))                          # bilinear keeps a 2×2 grid's mean
    const = torch.ones(1, 9, 2)
    torch.testing.assert_close(resize_tokens(const, (3, 3), (2, 2)), torch.ones(1, 4, 2))


def test_student_equal_to_the_teacher_has_zero_loss_and_no_gradient_reaches_the_teacher(fmnist_small):
    m = Distill(DistillParams(teacher=OLD_RUN, teacher_precision="fp32"), student(), channels=1, image_size=28)
    m.set_views(RANDOM)
    t = m.teacher()
    assert (t.dim, t.grid, t.channels, t.size) == (32, (2, 2), 1, 28) and m.params.dense == "on"
    x = images(fmnist_small)
    out = m({"views": [x]}, {})
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in t.net.parameters())
    assert m.projector.weight.grad.abs().sum() > 0 and m.dense_projector.weight.grad.abs().sum() > 0
    assert m.student.net.conv1.weight.grad.abs().sum() > 0
    assert {"distill_global_loss", "distill_dense_loss"} <= set(out["monitor"])
    # the teacher's own network as the student, identity projectors: the loss is 0
    twin = Distill(DistillParams(teacher=OLD_RUN, teacher_precision="fp32"), copy.deepcopy(t.net), 1, 28)
    twin.set_views(RANDOM)
    with torch.no_grad():
        for proj in (twin.projector, twin.dense_projector):
            proj.weight.copy_(torch.eye(32))
            proj.bias.zero_()
    twin.student.eval()
    assert twin({"views": [x]}, {})["loss"].item() == pytest.approx(0.0, abs=1e-5)
    # evaluation and export use the student; the teacher is no part of the state
    assert m.backbone is m.student and not any(k.startswith("_teacher") for k in m.state_dict())


def test_teacher_input_is_the_view_in_the_teachers_channels_size_and_normalisation(tmp_path, fmnist_small):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    p = DistillParams(teacher="timm:vit_tiny_patch16_224", teacher_weights=str(tmp_path / "vit.safetensors"),
                      teacher_size=32, teacher_precision="fp32")
    m = Distill(p, student(), channels=1, image_size=28)
    m.set_views(RANDOM)
    t = m.teacher()
    assert (t.dim, t.grid, t.channels, t.size) == (192, (2, 2), 3, 32)
    x = images(fmnist_small, 4)
    want = torch.nn.functional.interpolate((x * 0.5 + 0.5).repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear",
                                           align_corners=False, antialias=True)
    want = (want - torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(t.inputs(x, (0.5,), (0.5,)), want)
    f = t.features(x, (0.5,), (0.5,))
    ref = vit.forward_features(want)
    torch.testing.assert_close(f.cls, ref[:, 0], atol=5e-3, rtol=1e-3)               # the loaded weights
    m({"views": [x]}, {})["loss"].backward()                                           # student 4×4 -> teacher 2×2


def test_every_kind_of_teacher_loads_or_is_one_clear_line(tmp_path, fmnist_small):
    export(OLD_RUN, tmp_path / "teacher.safetensors")
    m = Distill(DistillParams(teacher=str(tmp_path / "teacher.safetensors")), student(), 1, 28)
    assert m.teacher().dim == 32 and m.params.teacher_dim == 32
    for params, words in ((DistillParams(), "method.teacher: name the teacher"),
                          (DistillParams(teacher=str(tmp_path / "nope")), "does not exist"),
                          (DistillParams(teacher="timm:resnet18"), "needs weights: method.teacher_weights"),
                          (DistillParams(teacher=OLD_RUN, dense="on"), None)):
        if words is None:
            Distill(params, student(), 1, 28)
            continue
        with pytest.raises(ValueError, match=words):
            Distill(params, student(), 1, 28)
    flat = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    from selfsight.backbones import wrap
    with pytest.raises(ValueError, match="method.dense=on: the teacher and the student both need spatial tokens"):
        Distill(DistillParams(teacher=OLD_RUN, dense="on"), wrap(flat, in_chans=1, probe_size=28), 1, 28)
    off = Distill(DistillParams(teacher=OLD_RUN), wrap(flat, in_chans=1, probe_size=28), 1, 28)
    assert off.params.dense == "off" and off.dense_projector is None


def test_cache_returns_the_teachers_features_and_refuses_random_views(tmp_path, fmnist_small):
    x = images(fmnist_small)
    plain = Distill(DistillParams(teacher=OLD_RUN, teacher_precision="fp32"), student(), 1, 28)
    plain.set_views(RANDOM)
    assert plain._cache is None                                  # auto: random views are never cached
    want = plain._teacher_features(x)
    for kind in ("memory", "disk"):
        m = Distill(DistillParams(teacher=OLD_RUN, teacher_precision="fp32", cache=kind,
                                  cache_dir=str(tmp_path / "cache")), student(), 1, 28)
        m.set_views(FIXED)
        first = m._teacher_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):         # the engine's autocast: fp16 entries widened
            again = m._teacher_features(x)
        assert (m._cache.hits, m._cache.misses) == (16, 16)
        for f in (first, again):
            torch.testing.assert_close(f.cls, want.cls, atol=2e-2, rtol=2e-3)    # stored in fp16
            torch.testing.assert_close(f.patch, want.patch, atol=2e-2, rtol=2e-3)
    reopened = Distill(DistillParams(teacher=OLD_RUN, cache="disk", cache_dir=str(tmp_path / "cache")),
                       student(), 1, 28)
    reopened.set_views(FIXED)
    reopened._teacher_features(x[:4])
    assert (reopened._cache.hits, reopened._cache.misses) == (4, 0)                # kept on disk across runs
    auto = Distill(DistillParams(teacher=OLD_RUN), student(), 1, 28)
    auto.set_views(FIXED)
    assert auto._cache.kind == "memory"
    with pytest.raises(ValueError, match="method.cache=memory: the views are random"):
        Distill(DistillParams(teacher=OLD_RUN, cache="memory"), student(), 1, 28).set_views(RANDOM)
    with pytest.raises(ValueError, match="cache=disk needs method.cache_dir"):
        Distill(DistillParams(teacher=OLD_RUN, cache="disk"), student(), 1, 28).set_views(FIXED)


def make():
    m = Distill(DistillParams(teacher=OLD_RUN, teacher_precision="fp32"), student(), 1, 28)
    m.set_views(RANDOM)
    m.teacher().net.double()
    torch.manual_seed(1)
    for proj in (m.projector, m.dense_projector):
        torch.nn.init.normal_(proj.weight, std=0.2)
    return m.double()


def run(model, x):
    out = model({"views": [x]}, {})
    out["loss"].backward()
    return out["loss"].detach(), {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def _worker(rank, x):
    part = slice(rank * 8, (rank + 1) * 8)
    model = make()
    model = convert_sync_batchnorm(model, "cpu")                                        # global BN, as sync_bn
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss, grads = run(ddp, x[part])
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads}


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    x = images(fmnist_small).double()
    got = run_on_gloo(_worker, tmp_path, x)
    loss, grads = run(make(), x)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys() and "dense_projector.weight" in grads
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-9, msg=f"gradient of {n}")
