"""Training throughput: selfsight vs a plain loop built from lightly's parts (SimCLR, MoCo v2,
BYOL, SimSiam, DINO, MAE).

The joint-embedding methods: same model (torchvision resnet18, ImageNet stem, 3-channel input),
same global batch (256), same data (Fashion-MNIST as RGB at 32 px), same optimizer (SGD, momentum
0.9, lr 0.06·B/128, wd 5e-4) and precision, same views on both sides (blur off at 32 px on both
sides, as selfsight's small preset).

* SimCLR: 2-layer BN projector 512-512-128, NT-Xent τ 0.5, SimCLR views (crop 0.08-1, flip,
  jitter 0.8 with p 0.8, grayscale 0.2, no blur); lightly: ``NTXentLoss`` + ``SimCLRTransform``.
* MoCo v2: MLP head 512-512-128 without BN, momentum encoder (m 0.99), a queue (memory bank) of
  4,096 keys, InfoNCE τ 0.2, asymmetric loss, MoCo v2 views without blur (crop 0.2-1, jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2); lightly: ``MoCoProjectionHead``,
  ``update_momentum``, ``NTXentLoss(memory_bank_size=(4096, 128))`` and ``MoCoV2Transform``, as
  lightly's MoCo example (no shuffle-BN). selfsight runs twice: as it trains by default
  (shuffle-BN with 8 BN groups) and with shuffle-BN off, the same work as lightly's loop.
* BYOL: projector and predictor MLPs 512-1024-256 and 256-1024-256 (Linear -> BN -> ReLU ->
  Linear, no output BN; the paper: 4096 hidden), a target network (backbone + projector) as an
  EMA of the online one with τ following a cosine from 0.99 to 1 over the run, the symmetric loss,
  each view in its own pass through online and target. Views: BYOL's asymmetric pair without blur
  (both views crop 0.08-1, flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; solarize p 0
  on view 1 and 0.2 on view 2). selfsight: ``method.name=byol method.hidden_dim=1024
  method.dim=256 method.momentum=0.99 method.momentum_end=1`` with its default views at
  ``views.blur_p=0``; lightly:
  ``BYOLProjectionHead(512, 1024, 256)``, ``BYOLPredictionHead(256, 1024, 256)``,
  ``update_momentum`` with ``cosine_schedule(step, steps, 0.99, 1)``, ``NegativeCosineSimilarity``
  and ``BYOLTransform(BYOLView1Transform(32, gaussian_blur=0), BYOLView2Transform(32,
  gaussian_blur=0))`` (its defaults are the same jitter, crop, grayscale and solarize values).
  Left unmatched, no cost difference: the loss scale (selfsight 2 - 2cos summed over the two
  directions, lightly -cos averaged: 4x the gradient; the ``--knn`` rows train selfsight at a
  quarter of the lr and 4x the weight decay, the same SGD updates as lightly's), where the EMA sits in the step (selfsight after the
  optimizer step, lightly's example before the forward) and which Linear of each MLP has the
  bias (selfsight: the hidden one, as the official code; lightly: the output one).
* SimSiam: 3-layer projector 512-512-512 (hidden = the backbone width, as the official code;
  Linear(no bias) -> BN -> ReLU twice, Linear -> affine-free BN; the paper: 2048 out), predictor
  bottleneck 512-128-512 (the paper's 4:1 ratio, 2048-512-2048), negative cosine with
  stop-gradient, symmetric, separate passes per view, zero-initialized residual BNs on both sides.
  Views: MoCo v2's without blur (crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2).
  selfsight: ``method.name=simsiam method.dim=512 method.proj_hidden_dim=512 method.proj_layers=3
  method.pred_hidden_dim=128`` (the predictor at a fixed lr, its default: one extra param group,
  no extra work); lightly:
  ``SimSiamProjectionHead(512, 512, 512)``, ``SimSiamPredictionHead(512, 128, 512)``,
  ``NegativeCosineSimilarity`` and ``SimSiamTransform(input_size=32, gaussian_blur=0)``.
* DINO: multi-crop, 2 global crops at 32 px (0.4-1) and 6 local crops at 16 px (0.05-0.4), the
  BYOL/DINO jitter, grayscale 0.2, solarize 0.2 on the second global crop, no blur; the head
  512-512-64 -> L2 norm -> weight-normed 2048 (no BN), teacher by EMA (0.996 -> 1, cosine),
  centering 0.9, τ_s 0.1, τ_t 0.04, the last layer frozen in the first epoch, no gradient
  clipping, constant weight decay. selfsight: ``method.name=dino method.hidden_dim=512
  method.bottleneck_dim=64 method.out_dim=2048 views.local_crops=6 views.local_size=16`` (one
  backbone forward per resolution); lightly: ``DINOProjectionHead(512, 512, 64, 2048,
  freeze_last_layer=1)``, ``DINOLoss``, ``update_momentum``, ``cancel_last_layer_gradients`` and
  ``DINOTransform(32, local_crop_size=16, n_local_views=6, gaussian_blur=(0, 0, 0))`` as lightly's
  DINO example (one forward per crop).
* MAE (its own model and optimizer): the same timm ViT on both sides (``vit_tiny_patch16_224``
  built with ``pretrained=False, img_size=32, patch_size=4, depth=6``: 6 blocks, 192 wide, 3
  heads, an 8×8 grid of 64 patches, class token, fixed 2-D sin-cos position embedding), random
  masking of 75 % (16 visible patches + the class token through the encoder), a decoder of 2 timm
  blocks 128 wide with 4 heads (MLP ratio 4, fixed sin-cos positions, class token kept; the size
  of selfsight's Fashion-MNIST recipe), norm-pix MSE on the masked patches, AdamW (0.9, 0.95),
  lr 1.5e-4·B/256, wd 0.05, views crop 0.2-1 + flip at 32 px. selfsight: ``method.name=mae
  backbone.name=vit_tiny backbone.depth=6 backbone.patch_size=4 method.head.decoder_dim=128
  method.head.decoder_depth=2 method.head.decoder_heads=4``; lightly 1.6.0:
  ``MaskedVisionTransformerTIMM`` (encoder on ``idx_keep`` from ``random_token_mask``),
  ``MaskedVisionTransformerDecoderTIMM`` with a Linear in and a Linear out (1.6.0 deprecates
  ``MAEDecoderTIMM`` for it, pointing to its MAE example; the same timm blocks),
  ``MAETransform(32)``, and MSE on per-patch normalized targets (MAE's ``norm_pix_loss``; lightly's
  example regresses raw pixels).
  Left unmatched, small cost differences: lightly predicts pixels for the masked tokens only
  (selfsight for all, then selects), its ViT is built without ``dynamic_img_size``, its crop is
  bicubic (selfsight: bilinear, batched on the device), and its AdamW is PyTorch's default
  (foreach) with weight decay on every parameter (selfsight: the fused kernel, no decay on biases
  and norms). selfsight's own choices stay on: the math attention kernel for short sequences on
  the CPU (``nn/attention.py``).

Adding a method: one ``Bench`` entry in ``BENCHES`` (its selfsight overrides, extra selfsight
rows, and a builder of the lightly loop returning a ``LightlyLoop``: the per-image transform that
gives the list of views, the trained parameters, the step ``views, step, steps -> loss`` and an
optional hook after the backward pass; any number of views, e.g. DINO's multi-crop, go through the
same loop).

Each configuration runs in its own process (so the peak memory is its own), warms up, then
times a fixed number of steps. Prints images/s, the share of step time spent waiting for data,
peak memory, and the ratio to lightly's loop for the same method.

    pip install 'selfsight[bench]'     # lightly
    python benchmarks/throughput_vs_lightly.py --steps 30 [--methods simclr,mocov2,byol,simsiam,dino,mae]
    python benchmarks/throughput_vs_lightly.py --methods simclr --steps 200 --knn 10000   # + kNN top-1 of each side
    python benchmarks/throughput_vs_lightly.py --steps 20 --repeats 3 --ceiling

``--repeats N`` runs every row N times, a method's rows back to back, odd rounds in reverse
order, and prints the median images/s with the median and range of the rounds' ratios (on a
shared 2-core machine one row moves by a third between minutes). ``--ceiling``: each row then
times as many steps again on its last batch reused, in the same process: the step with no data
path at all. A selfsight row's step alone against lightly's loop is the most that any data path
could give with this model on this machine; against lightly's step alone it compares the
training steps themselves (model, loss, optimizer, EMA).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

ROW = "ROW "
LIGHTLY_ROW = "lightly plain loop"


def peak_mb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rgb_fmnist():
    from selfsight.data import ArrayDataset, build_dataset
    ds = build_dataset("fashion-mnist")
    return ArrayDataset(ds.images.expand(-1, 3, -1, -1).contiguous(), ds.labels, name="fmnist-rgb")


def knn_top1(backbone, device: str, bank: int) -> float:
    """kNN top-1 (k 20, T 0.07; selfsight.eval.knn) of ``backbone`` on the first 2,000 Fashion-MNIST test
    images with the first ``bank`` training images as the bank; both sides get the same input through
    ``selfsight.eval.features.extract``: RGB, 28 -> 32 px bilinear, ImageNet normalisation (what the
    views are normalised with on both sides), bf16 autocast."""
    import torch

    from selfsight.data import ArrayDataset, build_dataset
    from selfsight.eval.features import extract
    from selfsight.eval.knn import knn_accuracy
    pre = {"size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    train, test = build_dataset("fashion-mnist"), build_dataset("fashion-mnist:test")
    was_training = backbone.training
    backbone.eval()
    bank_f, bank_y = extract(backbone, ArrayDataset(train.images[:bank], train.labels[:bank]), pre, device, 500,
                             workers=0, amp_dtype=torch.bfloat16)
    test_f, test_y = extract(backbone, ArrayDataset(test.images[:2000], test.labels[:2000]), pre, device, 500,
                             workers=0, amp_dtype=torch.bfloat16)
    backbone.train(was_training)
    return float(knn_accuracy(bank_f, bank_y, test_f, test_y)["top1"])


# ----------------------------------------------------------------------------------- lightly loops

@dataclass
class LightlyLoop:
    """What a method contributes to the plain lightly loop."""
    transform: Callable                              # PIL image -> list of view tensors
    params: list                                     # parameters the optimizer trains
    step: Callable                                   # (views on device, step, total steps) -> loss
    modules: list = field(default_factory=list)      # moved to the device before training
    after_backward: Callable | None = None           # (step, total steps), before the optimizer step
                                                     # (e.g. DINO's cancel_last_layer_gradients)
    optimizer: Callable | None = None                # (params, batch) -> optimizer; None = the shared SGD
    backbone: Any = None                             # the network kNN (--knn) evaluates: images -> B×D


def resnet18_backbone(**kw):
    import torch
    import torchvision
    backbone = torchvision.models.resnet18(**kw)
    backbone.fc = torch.nn.Identity()
    return backbone


def lightly_simclr(args) -> LightlyLoop:
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    model = torch.nn.Sequential(resnet18_backbone(), SimCLRProjectionHead(512, 512, 128))
    crit = NTXentLoss(temperature=0.5)

    def step(views, i, n):
        x0, x1 = views
        return crit(model(x0), model(x1))
    return LightlyLoop(SimCLRTransform(input_size=32, gaussian_blur=0.0, min_scale=0.08),
                       list(model.parameters()), step, [model], backbone=model[0])


def lightly_mocov2(args) -> LightlyLoop:
    import copy

    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform
    model = torch.nn.Sequential(resnet18_backbone(), MoCoProjectionHead(512, 512, 128))
    key_model = copy.deepcopy(model)
    deactivate_requires_grad(key_model)
    crit = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))

    def step(views, i, n):
        x0, x1 = views
        update_momentum(model, key_model, m=0.99)
        with torch.no_grad():
            key = key_model(x1)
        return crit(model(x0), key)
    return LightlyLoop(MoCoV2Transform(input_size=32, gaussian_blur=0.0), list(model.parameters()), step,
                       [model, key_model, crit], backbone=model[0])


def lightly_byol(args) -> LightlyLoop:
    import copy

    import torch
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule
    online = torch.nn.Sequential(resnet18_backbone(), BYOLProjectionHead(512, BYOL_HIDDEN, BYOL_DIM))
    predictor = BYOLPredictionHead(BYOL_DIM, BYOL_HIDDEN, BYOL_DIM)
    target = copy.deepcopy(online)                   # stays in train mode: batch statistics, as BYOL
    deactivate_requires_grad(target)
    crit = NegativeCosineSimilarity()

    def step(views, i, n):
        x0, x1 = views
        update_momentum(online, target, m=cosine_schedule(i, n, BYOL_MOMENTUM, 1.0))
        p0, p1 = predictor(online(x0)), predictor(online(x1))
        with torch.no_grad():
            t0, t1 = target(x0), target(x1)
        return 0.5 * (crit(p0, t1) + crit(p1, t0))
    transform = BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                              BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    return LightlyLoop(transform, list(online.parameters()) + list(predictor.parameters()), step,
                       [online, predictor, target], backbone=online[0])


def lightly_simsiam(args) -> LightlyLoop:
    import torch
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform
    model = torch.nn.Sequential(resnet18_backbone(zero_init_residual=True),
                                SimSiamProjectionHead(512, 512, SIMSIAM_DIM))
    predictor = SimSiamPredictionHead(SIMSIAM_DIM, SIMSIAM_PRED_HIDDEN, SIMSIAM_DIM)
    crit = NegativeCosineSimilarity()

    def step(views, i, n):
        x0, x1 = views
        z0, z1 = model(x0), model(x1)
        p0, p1 = predictor(z0), predictor(z1)
        return 0.5 * (crit(p0, z1.detach()) + crit(p1, z0.detach()))
    return LightlyLoop(SimSiamTransform(input_size=32, gaussian_blur=0.0),
                       list(model.parameters()) + list(predictor.parameters()), step, [model, predictor],
                       backbone=model[0])


# ------------------------------------------------------------------------------------- the table

def lightly_dino(args) -> LightlyLoop:
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    def network():
        return torch.nn.Sequential(resnet18_backbone(),
                                   DINOProjectionHead(512, DINO_HIDDEN, DINO_BOTTLENECK, DINO_K, freeze_last_layer=1))
    student, teacher = network(), network()     # as lightly's example: its weight-normed head cannot be deep-copied
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    crit = DINOLoss(output_dim=DINO_K, warmup_teacher_temp_epochs=1)
    transform = DINOTransform(global_crop_size=32, local_crop_size=DINO_LOCAL_SIZE, n_local_views=DINO_LOCAL,
                              gaussian_blur=(0.0, 0.0, 0.0))

    def step(views, i, n):
        update_momentum(student, teacher, m=cosine_schedule(i, n, 0.996, 1.0))
        with torch.no_grad():
            t_out = [teacher(v) for v in views[:2]]
        s_out = [student(v) for v in views]
        return crit(t_out, s_out, epoch=0)

    def after_backward(i, n):
        student[1].cancel_last_layer_gradients(current_epoch=0)
    return LightlyLoop(transform, list(student.parameters()), step, [student, teacher, crit], after_backward,
                       backbone=teacher[0])                  # DINO evaluates the teacher


def lightly_mae(args) -> LightlyLoop:
    import timm
    import torch
    import torch.nn.functional as F
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=MAE_PATCH, depth=MAE_DEPTH)
    encoder = MaskedVisionTransformerTIMM(vit=vit)               # fixed sin-cos positions by default
    decoder = MaskedVisionTransformerDecoderTIMM(num_patches=vit.patch_embed.num_patches, embed_dim=MAE_DEC_DIM,
                                                 depth=MAE_DEC_DEPTH, num_heads=MAE_DEC_HEADS)
    embed = torch.nn.Linear(vit.embed_dim, MAE_DEC_DIM)
    pred = torch.nn.Linear(MAE_DEC_DIM, MAE_PATCH ** 2 * 3)
    model = torch.nn.ModuleList([encoder, decoder, embed, pred])
    seq = encoder.sequence_length                                # 1 + 64

    def step(views, i, n):
        images = views[0]
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask((b, seq), mask_ratio=MAE_RATIO, device=images.device)
        x = embed(encoder.encode(images, idx_keep=idx_keep))      # B×(1+16)×d
        full = utils.set_at_index(utils.repeat_token(decoder.mask_token, (b, seq)), idx_keep, x.float())
        p = pred(utils.get_at_index(decoder(full), idx_mask))     # B×48×(p·p·3), masked tokens only
        target = utils.get_at_index(utils.patchify(images, MAE_PATCH), idx_mask - 1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return F.mse_loss(p.float(), target)

    def optimizer(params, batch):
        return torch.optim.AdamW(params, lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05)
    return LightlyLoop(MAETransform(input_size=32), list(model.parameters()), step, [model], optimizer=optimizer)


BYOL_HIDDEN, BYOL_DIM, BYOL_MOMENTUM = 1024, 256, 0.99
DINO_HIDDEN, DINO_BOTTLENECK, DINO_K, DINO_LOCAL, DINO_LOCAL_SIZE = 512, 64, 2048, 6, 16
SIMSIAM_DIM, SIMSIAM_PRED_HIDDEN = 512, 128
MAE_DEPTH, MAE_PATCH, MAE_RATIO, MAE_DEC_DIM, MAE_DEC_DEPTH, MAE_DEC_HEADS = 6, 4, 0.75, 128, 2, 4
# the joint-embedding rows' model and optimizer on the selfsight side (lightly's loop: resnet18_backbone, SGD)
SGD_LR, SGD_BASE_BATCH, SGD_WD = 0.06, 128, 5e-4      # both sides' SGD: lr SGD_LR·B/SGD_BASE_BATCH
RESNET_SGD = ["backbone.name=resnet18", "backbone.small_stem=none", "optim.name=sgd", f"optim.lr={SGD_LR}",
              "optim.momentum=0.9", f"optim.base_batch={SGD_BASE_BATCH}", f"optim.weight_decay={SGD_WD}"]


@dataclass
class Bench:
    label: str                                       # row prefix, e.g. "MoCo v2"
    overrides: list[str]                             # selfsight method settings matching the lightly loop
    lightly: Callable[[argparse.Namespace], LightlyLoop]
    # selfsight rows: row-name suffix -> extra overrides ({workers} is filled from --workers)
    selfsight_rows: dict[str, list[str]] = field(default_factory=lambda: {"": []})
    base: list[str] = field(default_factory=lambda: list(RESNET_SGD))    # model and optimizer overrides
    model: str = "resnet18"
    # selfsight's loss gradient over lightly's loop's (BYOL: 2 - 2cos summed over both directions
    # against -cos averaged: 4); the --knn rows divide selfsight's lr and multiply its weight decay
    # by it, which makes its SGD updates those of lightly's loop exactly
    loss_scale: float = 1.0


BENCHES = {
    "simclr": Bench("SimCLR", ["method.name=simclr", "method.temperature=0.5", "method.proj_hidden_dim=512"],
                    lightly_simclr,
                    {"": [], " (no channels-last, per-sample v2 aug in workers)": [
                        "backbone.channels_last=false", "data.device_augment=off", "data.workers={workers}"]}),
    "mocov2": Bench("MoCo v2", ["method.name=mocov2", "method.temperature=0.2", "method.queue_size=4096",
                                "method.momentum=0.99", "method.head_hidden_dim=512"],
                    lightly_mocov2,
                    {" (shuffle-BN, 8 BN groups)": [],
                     " (no shuffle-BN, as lightly's loop)": ["method.shuffle_bn=false", "method.bn_splits=1"]}),
    "byol": Bench("BYOL", ["method.name=byol", f"method.hidden_dim={BYOL_HIDDEN}", f"method.dim={BYOL_DIM}",
                           f"method.momentum={BYOL_MOMENTUM}", "method.momentum_end=1.0"],
                  lightly_byol, loss_scale=4.0),
    "simsiam": Bench("SimSiam", ["method.name=simsiam", f"method.dim={SIMSIAM_DIM}", "method.proj_hidden_dim=512",
                                 "method.proj_layers=3", f"method.pred_hidden_dim={SIMSIAM_PRED_HIDDEN}"],
                     lightly_simsiam),
    "dino": Bench("DINO", ["method.name=dino", f"method.hidden_dim={DINO_HIDDEN}",
                           f"method.bottleneck_dim={DINO_BOTTLENECK}", f"method.out_dim={DINO_K}",
                           "method.momentum=0.996", f"views.local_crops={DINO_LOCAL}",
                           f"views.local_size={DINO_LOCAL_SIZE}", "optim.clip_grad=0", "optim.weight_decay_end=-1"],
                  lightly_dino),
    "mae": Bench("MAE", ["method.name=mae", f"method.mask.ratio={MAE_RATIO}", f"method.head.decoder_dim={MAE_DEC_DIM}",
                         f"method.head.decoder_depth={MAE_DEC_DEPTH}", f"method.head.decoder_heads={MAE_DEC_HEADS}"],
                 lightly_mae,
                 base=["backbone.name=vit_tiny", f"backbone.depth={MAE_DEPTH}", f"backbone.patch_size={MAE_PATCH}",
                       "backbone.pos_embed=sincos", "optim.name=adamw", "optim.lr=1.5e-4", "optim.base_batch=256",
                       "optim.betas=[0.9,0.95]", "optim.weight_decay=0.05"],
                 model=f"ViT {MAE_DEPTH}x192 patch {MAE_PATCH}"),
}

CONFIGS = {}    # row name -> (method, "selfsight" | "lightly", extra selfsight overrides)
for _key, _b in BENCHES.items():
    for _suffix, _extra in _b.selfsight_rows.items():
        CONFIGS[f"{_b.label} selfsight{_suffix}"] = (_key, "selfsight", _extra)
    CONFIGS[f"{_b.label} {LIGHTLY_ROW}"] = (_key, "lightly", [])


# ------------------------------------------------------------------------------------ the runners

def run_selfsight(args, method: str, extra: list[str]) -> dict:
    from selfsight.engine.trainer import Trainer
    from selfsight.resolve import load_config
    steps = args.warmup + args.steps * (2 if args.ceiling else 1)
    over = BENCHES[method].base + BENCHES[method].overrides + [
            "views.size=32", "views.blur_p=0", f"data.batch_size={args.batch}",
            f"train.steps={steps}", "train.progress=false", "train.tensorboard=false",
            "train.checkpoint_every=0", f"train.log_every={steps}", f"train.precision={args.precision}"]
    if args.knn and BENCHES[method].base == RESNET_SGD:
        # accuracy rows: lightly's plain loop trains at a constant lr, so selfsight does too (no warm-up,
        # the cosine floor at the peak) instead of its recipe's schedule, with lightly's update size
        scale = BENCHES[method].loss_scale
        over += ["optim.warmup_epochs=0", f"optim.lr={SGD_LR / scale}",
                 f"optim.min_lr={SGD_LR * args.batch / SGD_BASE_BATCH / scale}", f"optim.weight_decay={SGD_WD * scale}"]
    cfg = load_config(overrides=over + [e.format(workers=args.workers) for e in extra])
    import tempfile
    tr = Trainer(cfg, tempfile.mkdtemp(prefix="bench_"), dataset=rgb_fmnist())
    # the clock: after the warm-up steps, at the end of the timed ones, and (--ceiling) at the end
    # of as many steps again on the last batch reused (the step alone, in the same process)
    marks = {args.warmup: "t", args.warmup + args.steps: "t_full", args.warmup + 2 * args.steps: "t_alone"}
    state = {}                                     # mark -> (time, data wait so far)
    real_step = tr.optimizer.step

    def timed_step(*a, **k):
        out = real_step(*a, **k)
        if tr.step + 1 in marks:
            state[marks[tr.step + 1]] = time.perf_counter(), tr.loader.wait
        return out
    tr.optimizer.step = timed_step
    if args.ceiling:
        fresh_batches = tr.loader.epoch

        def then_one_batch(epoch, start=0):
            for batch in fresh_batches(epoch, start):
                yield batch
                while tr.step >= args.warmup + args.steps:      # the timed steps are done: this batch again
                    yield batch
        tr.loader.epoch = then_one_batch
    tr.fit()
    dt = state["t_full"][0] - state["t"][0]
    out = {"images_per_s": args.steps * args.batch / dt, "data_wait": (state["t_full"][1] - state["t"][1]) / dt,
           "peak_mb": peak_mb(tr.device.type)}
    if args.ceiling:
        out["alone_images_per_s"] = args.steps * args.batch / (state["t_alone"][0] - state["t_full"][0])
    if args.knn:
        out["knn_top1"] = knn_top1(tr.model.backbone, tr.device.type, args.knn)   # DINO's: the teacher
    return out


def run_lightly(args, method: str) -> dict:
    import torch
    from PIL import Image
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = rgb_fmnist()
    loop = BENCHES[method].lightly(args)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            img = Image.fromarray(data.images[i].permute(1, 2, 0).numpy())
            return loop.transform(img), int(data.labels[i])
    loader = torch.utils.data.DataLoader(DS(), batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    for m in loop.modules:
        m.to(device)
    opt = loop.optimizer(loop.params, args.batch) if loop.optimizer is not None else \
        torch.optim.SGD(loop.params, lr=SGD_LR * args.batch / SGD_BASE_BATCH, momentum=0.9, weight_decay=SGD_WD)
    amp = args.precision != "fp32"
    total = args.warmup + args.steps
    it = iter(loader)
    wait = 0.0
    t0 = None

    def train_step(views, step):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = loop.step(views, step, total)
        opt.zero_grad()
        loss.backward()
        if loop.after_backward is not None:
            loop.after_backward(step, total)
        opt.step()
    for step in range(total):
        if step == args.warmup:
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        views, _ = next(it)
        wait += time.perf_counter() - tw
        views = [v.to(device) for v in views]
        train_step(views, step)
    dt = time.perf_counter() - t0
    out = {"images_per_s": args.steps * args.batch / dt, "data_wait": wait / dt, "peak_mb": peak_mb(device)}
    if args.ceiling:            # lightly's step alone: its last views again, no data path, as selfsight's rows
        t1 = time.perf_counter()
        for _ in range(args.steps):
            train_step(views, total - 1)
        out["alone_images_per_s"] = args.steps * args.batch / (time.perf_counter() - t1)
    if args.knn:
        out["knn_top1"] = knn_top1(loop.backbone, device, args.knn)
    return out


def run_row(args, name: str) -> dict:
    method, side, extra = CONFIGS[name]
    return run_selfsight(args, method, extra) if side == "selfsight" else run_lightly(args, method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for per-sample augmentation")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--methods", default=",".join(BENCHES), help=f"comma-separated: {', '.join(BENCHES)}")
    ap.add_argument("--knn", type=int, default=0, metavar="BANK",
                    help="after training, kNN top-1 of each side's backbone on 2,000 Fashion-MNIST test images "
                         "with BANK training images as the bank (ResNet rows; MAE has no kNN column); "
                         "selfsight then trains at lightly's constant lr")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all rows (each row in a new process, odd rounds in reverse order); the "
                         "table gives the median and the range of the rounds' ratios")
    ap.add_argument("--ceiling", action="store_true",
                    help="every row also times as many steps again on its last batch reused (the step alone, no "
                         "data path, same process): selfsight's against lightly's loop and lightly's step alone")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling and args.knn:
        ap.error("--ceiling trains extra steps on one batch: it would change the --knn accuracy; run them apart")
    if args.only:
        print(ROW + json.dumps(run_row(args, args.only)), flush=True)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BENCHES]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = [n for n, (m, _, _) in CONFIGS.items() if m in methods]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.repeats):
        for method in methods:
            group = [n for n in names if CONFIGS[n][0] == method]
            for name in group if round_ % 2 == 0 else group[::-1]:      # odd rounds reversed: drift cancels
                cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--batch", str(args.batch), "--workers", str(args.workers),
                       "--precision", args.precision, "--knn", str(args.knn if method != "mae" else 0)] \
                    + (["--ceiling"] if args.ceiling else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith(ROW)]
                if not line:
                    print(f"{name}: FAILED\n{out.stderr[-2000:]}")
                    runs[name].append(None)
                    continue
                runs[name].append(json.loads(line[-1][len(ROW):]))
                print(f"{name} (round {round_ + 1}): {runs[name][-1]}", flush=True)
    models = sorted({BENCHES[m].model for m in methods})
    rounds = f", median of {args.repeats} rounds (ratio: median and range of the rounds' ratios)" \
        if args.repeats > 1 else ""
    print(f"\n{' / '.join(models)}, batch {args.batch}, Fashion-MNIST RGB 32 px, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up{rounds}")
    extra = (" kNN top-1 |" if args.knn else "") + \
        (" step alone: images/s | vs lightly's loop | vs lightly's step alone |" if args.ceiling else "")
    print(f"| run | images/s | data wait | peak memory (MB) | vs lightly |{extra}\n|---|---|---|---|---|"
          + "---|" * extra.count("|"))
    for name in names:
        done = [r for r in runs[name] if r is not None]
        if not done:
            continue
        method = CONFIGS[name][0]
        ref = next((runs[n] for n in names if CONFIGS[n][0] == method and CONFIGS[n][1] == "lightly"), [])
        cells = ""
        if args.knn:
            accs = [r["knn_top1"] for r in done if "knn_top1" in r]
            cells += f" {statistics.median(accs):.4f} |" if accs else " n/a |"
        if args.ceiling:
            alone = [r["alone_images_per_s"] for r in done if "alone_images_per_s" in r]
            vs_step = _ratios(runs[name], ref, "alone_images_per_s", "alone_images_per_s")
            cells += (f" {statistics.median(alone):.0f} | {_ratios(runs[name], ref, 'alone_images_per_s')} | {vs_step} |"
                      if alone else " | | |")
        ips = statistics.median(r["images_per_s"] for r in done)
        wait = statistics.median(r["data_wait"] for r in done)
        print(f"| {name} | {ips:.0f} | {100 * wait:.1f} % | {max(r['peak_mb'] for r in done):.0f} | "
              f"{_ratios(runs[name], ref, 'images_per_s')} |" + cells)


def _ratios(rows: list, ref: list, key: str, ref_key: str = "images_per_s") -> str:
    """The median (and, over several rounds, the range) of ``rows[i][key]`` / ``ref[i][ref_key]``."""
    ratios = [a[key] / b[ref_key] for a, b in zip(rows, ref) if a and b and key in a and ref_key in b]
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.2f}x" + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


if __name__ == "__main__":
    main()
