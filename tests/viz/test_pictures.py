"""Pictures of tiny runs trained on real Fashion-MNIST images (viz/pictures.py): the PNGs and
their sizes, the PCA map against numpy's SVD, retrieval against a brute-force reference, and
the class-token attention of a ViT against softmax(q·kᵀ/√d) computed here from the block's
weights."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight.backbones.features import backbone_features
from selfsight.data import ArrayDataset
from selfsight.engine.trainer import pretrain
from selfsight.eval.features import extract
from selfsight.resolve import load_config
from selfsight.runs import load_run
from selfsight.viz.pictures import cls_attention, nearest_neighbours, pca_2d, write_pictures

MAE = {"method.name": "mae", "backbone.name": "vit_tiny", "backbone.patch_size": 7, "backbone.depth": 2,
       "views.size": 28, "data.batch_size": 32, "train.precision": "fp32", "train.progress": "false",
       "train.tensorboard": "false", "train.log_every": 1, "method.head.decoder_dim": 64,
       "method.head.decoder_depth": 1, "method.head.decoder_heads": 2, "optim.warmup_epochs": 0, "train.steps": 2}


@pytest.fixture(scope="module")
def test_images(fmnist_test):
    """600 real test images with their class names."""
    return ArrayDataset(fmnist_test.images[:600].clone(), fmnist_test.labels[:600].clone(), classes=fmnist_test.classes)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, fmnist_small):
    from helpers import tiny_overrides
    out = tmp_path_factory.mktemp("viz") / "simclr"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2, "train.log_every": 1})), out, dataset=fmnist_small)
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("viz") / "mae"
    pretrain(load_config(None, [f"{k}={v}" for k, v in MAE.items()]), out, dataset=fmnist_small)
    return out


@pytest.fixture(scope="module")
def resnet_features(resnet_run, test_images):
    model, _, pre = load_run(resnet_run)
    return extract(backbone_features(model.backbone), test_images, pre, "cpu", 256)


def png(path) -> Image.Image:
    with Image.open(path) as im:
        im.verify()                                  # a complete, valid PNG
    im = Image.open(path)
    assert im.format == "PNG"
    return im.convert("RGB")


def test_pictures_of_a_resnet_run_are_pngs_of_the_expected_sizes(resnet_run, test_images):
    q, k, n = 4, 5, 200
    written = write_pictures(resnet_run, data=test_images, n=n, queries=q, k=k, maps=("pca", "tsne"))
    assert {"embedding_pca", "embedding_tsne", "retrieval", "curve_loss", "curve_lr"} <= set(written)
    assert png(written["embedding_tsne"]).size == (760, 560)
    assert "attention" not in written and "mim_masks" not in written          # a ResNet, SimCLR
    assert all(p.parent == resnet_run / "pictures" and p.exists() for p in written.values())
    tile = 28 * 3                                                             # 28 px shown at 3x (>= 64)
    assert png(written["retrieval"]).size == ((k + 1) * (tile + 2) + 2, q * (tile + 2) + 2)
    emb = np.asarray(png(written["embedding_pca"]))
    assert emb.shape == (560, 760, 3)
    colours = {tuple(c) for c in emb.reshape(-1, 3)[::7]}
    assert len(colours) > 20                                                  # ten classes, axes, text
    assert png(written["curve_loss"]).size == (352, 240)
    # the map's dots are the classes' tab10 colours: each of the 10 classes appears
    from selfsight.viz.draw import color
    px = emb.reshape(-1, 3)
    for c in range(10):
        assert (np.abs(px.astype(int) - np.array(color(c))).sum(1) == 0).sum() > 20, c


def test_pca_map_equals_numpy_svd_of_the_centred_features_up_to_sign(resnet_features):
    feats, _ = resnet_features
    xy = pca_2d(feats).double().numpy()
    x = feats.double().numpy()
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    assert s[1] > s[2] * 1.01                                              # the two directions are defined
    for j in range(2):
        err = min(np.abs(xy[:, j] - ref[:, j]).max(), np.abs(xy[:, j] + ref[:, j]).max())
        assert err < 1e-4 * np.abs(ref[:, j]).max(), (j, err)


def test_retrieval_finds_the_query_first_then_the_reference_neighbours(resnet_features):
    feats, labels = resnet_features
    queries = torch.tensor([0, 17, 123, 598])
    sims, idx = nearest_neighbours(feats[queries], feats, 6)
    assert torch.equal(idx[:, 0], queries)
    assert torch.allclose(sims[:, 0], torch.ones(4), atol=1e-5)
    f = feats.double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    ref = np.argsort(-(f[queries.numpy()] @ f.T), axis=1)[:, :6]
    assert np.array_equal(idx.numpy(), ref)
    # on real images the neighbours share the query's class far above chance (0.1), even after 2 steps
    _, idx = nearest_neighbours(feats[:200], feats, 6)
    agree = (labels[idx[:, 1:]] == labels[:200, None]).float().mean()
    assert agree > 0.3, agree


def _reference_cls_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d [+ relative position bias]) of the last block, from its qkv weights."""
    net = backbone.net
    t = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    bias = backbone.rel_pos_bias.get_bias() if backbone.rel_pos_bias is not None else None
    for blk in net.blocks[:-1]:
        t = blk(t) if bias is None else blk(t, attn_mask=bias)
    last = net.blocks[-1]
    y = last.norm1(t)                                                         # B×(1+N)×D
    d, heads = y.shape[-1], last.attn.num_heads
    w, b = last.attn.qkv.weight, last.attn.qkv.bias
    q = (y @ w[:d].T + b[:d]).unflatten(-1, (heads, d // heads)).transpose(1, 2)       # B×H×(1+N)×d/H
    k = (y @ w[d:2 * d].T + b[d:2 * d]).unflatten(-1, (heads, d // heads)).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if bias is not None:
        logits = logits + bias
    a = torch.softmax(logits, -1)[:, :, 0, 1:]                                # class-token row, patches
    g = x.shape[-1] // backbone.patch_size
    return a.reshape(x.shape[0], heads, g, g)


def test_attention_of_a_trained_vit_equals_the_softmax_reference(mae_run, test_images):
    model, _, pre = load_run(mae_run)
    x = (test_images.images[:6].float() / 255 - 0.5) / 0.5
    got = cls_attention(model.backbone, x)
    assert got.shape == (6, 3, 4, 4)                                          # vit_tiny: 3 heads; 28/7 = 4
    with torch.no_grad():
        ref = _reference_cls_attention(model.backbone, x)
    assert torch.allclose(got, ref, atol=1e-6)
    assert bool((got.sum((-1, -2)) < 1).all())                                # the rest is on the class token
    assert got.std(0).mean() > 1e-4                                           # depends on the image


def test_attention_includes_the_relative_position_bias(fmnist_small):
    from selfsight.backbones.vit import ViTBackbone
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=2, rel_pos_bias=True,
                      pos_embed="none").eval()
    torch.nn.init.normal_(vit.rel_pos_bias.relative_position_bias_table, std=1.0)    # not zero: it must count
    x = (fmnist_small.images[:4].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        ref = _reference_cls_attention(vit, x)
        table = vit.rel_pos_bias.relative_position_bias_table
        kept = table.clone()
        table.zero_()
        without = _reference_cls_attention(vit, x)
        table.copy_(kept)
    assert not torch.allclose(ref, without, atol=1e-3)
    assert torch.allclose(cls_attention(vit, x), ref, atol=1e-6)


def test_mae_run_pictures_include_attention_and_masks_through_the_cli(mae_run, tmp_path, capsys):
    from selfsight.cli import main
    out = tmp_path / "pics"
    assert main(["pictures", str(mae_run), "--data", "fashion-mnist:test", "--images", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = {p.stem for p in out.glob("*.png")}
    assert {"attention", "mim_masks", "embedding_pca", "retrieval", "curve_loss", "curve_mim_loss"} <= names
    assert all(f"{n}: " in printed for n in names)
    tile = 84
    assert png(out / "attention.png").size == ((3 + 2) * (tile + 2) + 2, 8 * (tile + 2) + 2)   # image, 3 heads, mean
    # MAE's picture: 8 rows of image | masked | reconstruction | pasted, each enlarged to 56 px (28 * (64 // 28))
    assert png(out / "mim_masks.png").size == (4 * 58 + 2, 8 * 58 + 2)
    if importlib.util.find_spec("umap") is None:             # an optional map: a one-line error, no traceback
        assert main(["pictures", str(mae_run), "--map", "umap", "--out", str(out)]) == 2
        assert "pip install umap-learn" in capsys.readouterr().err
