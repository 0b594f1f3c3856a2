"""Masked image modeling (methods/mim.py) on real Fashion-MNIST images: the unified framework
composed from config, each recipe learning, masks drawn with the batch, frozen / EMA teachers,
the tokenizer slot, the global term and the reconstruction picture."""
import json

import pytest
import torch
import torch.nn as nn

from selfsight.backbones.resnet import ResNetBackbone
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import ConfigError
from selfsight.engine.trainer import pretrain
from selfsight.methods import build_method
from selfsight.methods.mim import MIM, MIMParams
from selfsight.resolve import load_config
from selfsight.runs import load_run
from selfsight.targets import TOKENIZERS, load_tokenizer, save_tokenizer

TINY = {"backbone.name": "vit_tiny", "backbone.patch_size": 4, "backbone.depth": 2, "views.size": 28,
        "data.batch_size": 32, "train.precision": "fp32", "train.progress": "false", "train.tensorboard": "false",
        "train.log_every": 5, "method.head.decoder_dim": 64, "method.head.decoder_depth": 1,
        "method.head.decoder_heads": 4, "optim.warmup_epochs": 0, "optim.lr": 2e-3, "optim.base_batch": 32}


def overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **extra}.items()]


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]


def vit(depth=2):
    torch.manual_seed(0)
    return ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=depth)


def batch_of(fmnist_small, n=8, views=1):
    x = (fmnist_small.images[:n].float() / 255 - 0.5) / 0.5
    return {"views": [x] * views}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, fmnist_small):
    """A selfsight run (SimCLR, resnet10) to serve as a frozen teacher."""
    from helpers import tiny_overrides
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(None, tiny_overrides(**{"method.name": "simclr", "train.steps": 3}))
    pretrain(cfg, out, dataset=fmnist_small)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("mae", {}),
    ("maskfeat", {"method.target.hog_cell": 2, "optim.clip_grad": 0.0}),
    ("maskdistill", {}),
])
def test_each_recipe_learns_on_real_images(tmp_path, fmnist_small, teacher_run, method, extra):
    if method == "maskdistill":
        extra = {**extra, "method.target.teacher": str(teacher_run)}
    cfg = load_config(None, overrides(**{"method.name": method, "train.steps": 60, **extra}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    ls = losses(tmp_path / "run")
    assert len(ls) == 12 and all(map(lambda v: v == v, ls))
    assert sum(ls[-3:]) / 3 < 0.9 * sum(ls[:2]) / 2, ls
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert 0.3 < rows[-1]["mask_ratio"] < 0.8


def test_presets_are_the_papers_recipes():
    mae = load_config(None, ["method.name=mae"])
    assert (mae.method.student_input, mae.method.mask.kind, mae.method.mask.ratio, mae.method.target.kind,
            mae.method.target.norm, mae.method.head.kind, mae.method.head.decoder_depth, mae.method.loss) == \
        ("sparse", "random", 0.75, "pixels", "patch", "decoder", 8, "l2")
    assert mae.optim.betas == (0.9, 0.95) and mae.backbone.pos_embed == "sincos" and mae.views.n_views == 1
    mf = load_config(None, ["method.name=maskfeat"])
    assert (mf.method.student_input, mf.method.mask.kind, mf.method.mask.ratio, mf.method.target.kind,
            mf.method.head.kind, mf.method.loss, mf.optim.clip_grad, mf.views.crop_scale) == \
        ("dense", "block", 0.4, "hog", "linear", "l2", 0.02, (0.5, 1.0))
    md = load_config(None, ["method.name=maskdistill"])
    assert (md.method.target.kind, md.method.target.norm, md.method.loss, md.method.head.kind) == \
        ("teacher", "layernorm", "smooth_l1", "linear")


def test_a_new_composition_from_yaml_trains(tmp_path, fmnist_small):
    """HOG targets through MAE's sparse encoder and decoder with a cosine loss: no code written."""
    recipe = tmp_path / "hog_mae.yaml"
    recipe.write_text("method:\n  name: mim\n  student_input: sparse\n  loss: cosine\n"
                      "  target: {kind: hog, hog_cell: 2, norm: none}\n  mask: {kind: random, ratio: 0.6}\n")
    cfg = load_config([str(recipe)], overrides(**{"train.steps": 4}))
    assert cfg.method.target.kind == "hog" and cfg.method.head.kind == "decoder"
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    assert all(v == v for v in losses(tmp_path / "run"))
    with pytest.raises(ConfigError, match="did you mean 'method.target.norm'"):
        load_config(None, overrides(**{"method.name": "mim", "method.target.nrom": "none"}))


def test_impossible_compositions_are_refused_with_the_key_named(fmnist_small):
    with pytest.raises(ValueError, match="student_input=sparse"):
        MIM(MIMParams(mask=MIMParams().mask.__class__(kind="block", ratio=0.4)), vit())
    p = MIMParams()
    p.loss = "ce"
    with pytest.raises(ValueError, match="method.loss='ce' does not fit"):
        MIM(p, vit())
    with pytest.raises(ValueError, match="needs a ViT"):
        MIM(MIMParams(), ResNetBackbone("resnet10", in_chans=1, width=8))
    p = MIMParams()
    p.mask.ratio = 1.5
    with pytest.raises(ValueError, match="method.mask.ratio must lie in"):
        MIM(p, vit())
    p = MIMParams()
    p.target.kind = "teacher"
    with pytest.raises(ValueError, match="method.target.teacher"):
        MIM(p, vit())


def test_masks_come_with_the_batch_and_are_reproducible(fmnist_small):
    from selfsight.augment import resolve_recipe
    from selfsight.config import ViewsConfig
    from selfsight.data.loader import ViewLoader
    model = MIM(MIMParams(), vit())
    recipe = resolve_recipe(ViewsConfig(n_views=1, size=28), 28, 1)

    def first_two(seed=0, start=0):
        loader = ViewLoader(fmnist_small, recipe, 16, torch.device("cpu"), seed=seed)
        loader.masker = model.make_masker()
        it = loader.epoch(0, start)
        return [next(it)["masks"][0] for _ in range(2)]
    a, b = first_two(), first_two()
    assert a[0].shape == (16, 49) and (a[0].sum(1) == 37).all()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])               # same seed: same masks
    assert not torch.equal(a[0], a[1])                                       # each step its own
    assert torch.equal(first_two(start=1)[0], a[1])                         # a resumed epoch regenerates them
    assert not torch.equal(first_two(seed=1)[0], a[0])


def test_frozen_teacher_from_a_run_is_not_trained_nor_checkpointed(tmp_path, fmnist_small, teacher_run):
    cfg = load_config(None, overrides(**{"method.name": "maskdistill", "method.target.teacher": str(teacher_run),
                                         "train.steps": 3}))
    teacher_before = {k: v.clone() for k, v in load_run(teacher_run)[0].backbone.state_dict().items()}
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    model, saved_cfg, pre = load_run(tmp_path / "run")
    assert saved_cfg.method.target.teacher_dim == 64                          # resnet10 width 8: 8·8 channels
    assert not any("_frozen" in k or k.startswith("target.") for k in model.state_dict())
    teacher = model.target._frozen[0]
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert not teacher.training
    # the run can be rebuilt and evaluated without the teacher's file
    saved = saved_cfg
    saved.method.target.teacher = str(tmp_path / "gone")
    rebuilt = build_method(saved, 1, 28)
    assert rebuilt.head.net.out_features == 64
    with pytest.raises(FileNotFoundError, match="gone"):
        rebuilt.target(torch.zeros(1, 1, 28, 28), (7, 7))


def test_timm_teacher_from_local_weights_gives_its_patch_tokens(tmp_path, fmnist_small):
    import timm
    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    p = MIMParams(student_input="dense", loss="smooth_l1")
    p.head.kind, p.mask.kind, p.mask.ratio = "linear", "block", 0.4
    p.target.kind, p.target.norm = "teacher", "none"
    p.target.teacher, p.target.teacher_weights = "timm:vit_small_patch16_224", str(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not fit timm:vit_small"):
        MIM(p, vit())
    p.target.teacher, p.target.teacher_size = "timm:vit_tiny_patch16_224", 112     # 112 px: a 7×7 grid like the student
    m = MIM(p, vit())
    assert m.head.net.out_features == 192 and p.target.teacher_dim == 192
    x = batch_of(fmnist_small)["views"][0]
    target = m.target(x, (7, 7))
    # by hand: gray -> RGB in [0, 1], bicubic to 112 px, the teacher's own mean/std, patch tokens
    rgb = (x * 0.5 + 0.5).expand(-1, 3, -1, -1)
    rgb = nn.functional.interpolate(rgb, size=(112, 112), mode="bicubic", antialias=True, align_corners=False)
    cfg = net.pretrained_cfg
    rgb = (rgb - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expect = net.forward_features(rgb)[:, 1:]
    torch.testing.assert_close(target, expect, rtol=1e-4, atol=1e-4)
    out = m(batch_of(fmnist_small), {})
    out["loss"].backward()
    assert not any(k.startswith("target") for k in m.state_dict())


def test_torchvision_teacher_gives_its_last_map_on_the_students_grid(tmp_path, fmnist_small):
    import torchvision
    torch.manual_seed(2)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    p = MIMParams(student_input="dense", loss="smooth_l1")
    p.head.kind, p.mask.kind, p.mask.ratio = "linear", "block", 0.4
    p.target.kind, p.target.norm, p.target.teacher_size = "teacher", "none", 64
    p.target.teacher, p.target.teacher_weights = "torchvision:resnet18", str(tmp_path / "r18.pth")
    m = MIM(p, vit())
    assert m.target.dim == 512
    x = batch_of(fmnist_small)["views"][0]
    rgb = nn.functional.interpolate((x * 0.5 + 0.5).expand(-1, 3, -1, -1), size=(64, 64), mode="bicubic",
                                    antialias=True, align_corners=False)
    rgb = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = nn.Sequential(*list(net.eval().children())[:-2])(rgb)                  # B×512×2×2
        expect = nn.functional.interpolate(fmap, size=(7, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.target(x, (7, 7)), expect.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_ema_teacher_follows_the_student_and_sees_the_intact_view(fmnist_small):
    p = MIMParams(student_input="dense", loss="smooth_l1")
    p.target.kind, p.target.norm, p.head.kind, p.mask.kind, p.mask.ratio = "ema", "layernorm", "linear", "block", 0.4
    m = MIM(p, vit())
    assert "teacher.net.pos_embed" in m.state_dict()
    b = batch_of(fmnist_small)
    out = m(b, {})
    out["loss"].backward()
    assert all(q.grad is None for q in m.teacher.parameters())
    before = [t.clone() for t in m.teacher.parameters()]
    with torch.no_grad():
        for q in m.student.parameters():
            q.add_(0.1)
    m.after_step({"momentum": 0.9})
    for t0, t, s in zip(before, m.teacher.parameters(), m.student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    assert m.schedules() == {"momentum": (0.999, 1.0)}


def test_tokenizer_slot_trains_with_cross_entropy_on_masked_tokens(tmp_path, fmnist_small):
    """A tokenizer registered by the user (here: mean intensity of each 4 px patch in 16 levels)
    saved as an artifact and used by path, BEiT-style: dense input, linear head, CE."""

    class IntensityTokenizer(nn.Module):
        def __init__(self, levels=16, patch=4):
            super().__init__()
            self.levels, self.patch, self.vocab_size = levels, patch, levels
            self.register_buffer("edges", torch.linspace(0, 1, levels + 1)[1:-1])

        def encode(self, x):                                   # x in [0, 1] (mean 0, std 1 preprocess)
            m = nn.functional.avg_pool2d(x.mean(1, keepdim=True), self.patch)[:, 0]   # B×h×w
            return torch.bucketize(m.clamp(0, 1), self.edges)

    if "intensity-test" not in TOKENIZERS:
        TOKENIZERS.register("intensity-test")(lambda cfg: IntensityTokenizer(**cfg))
    path = tmp_path / "tok.pt"
    save_tokenizer(IntensityTokenizer(), "intensity-test", {"levels": 16, "patch": 4},
                   {"size": 28, "mean": [0.0], "std": [1.0], "channels": 1}, path)
    tok, pre = load_tokenizer(path)
    assert tok.vocab_size == 16 and not tok.training
    cfg = load_config(None, overrides(**{
        "method.name": "mim", "method.student_input": "dense", "method.loss": "ce", "method.target.kind": "tokens",
        "method.target.tokenizer": str(path), "method.head.kind": "linear", "method.mask.kind": "block",
        "method.mask.ratio": 0.4, "train.steps": 80}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    ls = losses(tmp_path / "run")
    assert ls[0] > 1.5 and sum(ls[-3:]) / 3 < 0.9 * ls[0], ls              # CE falls (from ln 16 at init)
    with pytest.raises(Exception, match="unknown tokenizer"):
        save_tokenizer(IntensityTokenizer(), "nope", {}, pre, tmp_path / "bad.pt")
        load_tokenizer(tmp_path / "bad.pt")


def test_global_term_adds_nt_xent_on_two_masked_views(fmnist_small):
    p = MIMParams()
    p.head.decoder_dim, p.head.decoder_depth, p.head.decoder_heads = 64, 1, 4
    p.global_term.kind, p.global_term.weight = "contrastive", 0.5
    m = MIM(p, vit())
    assert m.masked_views == (0, 1)
    from selfsight.augment import BatchedViews, ViewRecipe
    views = BatchedViews(ViewRecipe(size=28, mean=(0.5,), std=(0.5,)), torch.Generator().manual_seed(0))(
        fmnist_small.images[:8])
    batch = {"views": views, "masks": m.make_masker()(views, 0)}
    torch.manual_seed(0)
    out = m(batch, {})
    mon = out["monitor"]
    assert out["loss"].item() == pytest.approx((mon["mim_loss"] + 0.5 * mon["global_loss"]).item(), rel=1e-5)
    out["loss"].backward()
    assert m.projector[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="views.n_views: 2"):
        m({"views": views[:1]}, {})


def test_reconstruction_picture_is_written(tmp_path, fmnist_small):
    from PIL import Image
    cfg = load_config(None, overrides(**{"method.name": "mae", "train.steps": 2}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    img = Image.open(tmp_path / "run" / "pictures" / "mim_masks.png")
    # 8 rows of 4 columns (input, masked, reconstruction, reconstruction + visible), 28 px shown at 56 px,
    # 2 px padding
    assert img.size == (4 * 58 + 2, 8 * 58 + 2)
