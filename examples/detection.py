"""Take an exported selfsight backbone into a detector (docs/dense.md).

    selfsight export runs/byol backbone_tv.safetensors --format torchvision
    python examples/detection.py backbone_tv.safetensors --steps 300

A ``torchvision`` export becomes the body of a ``torchvision.models.detection`` Faster R-CNN with a
feature pyramid (its ``fc``, an identity in the export, is the only module left over), trained here
on the boxes of the built-in ``fashion-mnist-scenes`` set. ``vit_pyramid`` shows the timm route for
a ViT export: ``forward_intermediates`` gives the patch-token map, and a ViTDet-style simple
pyramid (Li et al. 2022) turns it into the multi-scale maps a detection neck expects.

Only torchvision, timm and safetensors are used below, plus ``selfsight.deploy`` to rebuild a
non-stock ResNet (small-image stem, other widths, gray input) from the export's metadata.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from selfsight.deploy import read_metadata, torchvision_model


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d holding its statistics (detection trains
    with a few images per batch: batch statistics would be noise)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            frozen_batchnorm(child)
    return module


def resnet_fpn_detector(export_file: str, num_classes: int, image_size: int, fpn_channels: int = 64) -> FasterRCNN:
    """A Faster R-CNN whose body is the exported ResNet (strict load), with an FPN on layer2-4."""
    meta = read_metadata(export_file)
    body = torchvision_model(meta)          # torchvision.models.resnetXX(num_classes=D) for a stock ResNet
    body.load_state_dict(load_file(export_file), strict=True)
    frozen_batchnorm(body)
    with torch.no_grad():                   # the channels of layer2..4 (they depend on depth and width)
        probe = torch.zeros(1, meta["channels"], image_size, image_size)
        x = body.maxpool(body.relu(body.bn1(body.conv1(probe))))
        channels = []
        for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
            x = layer(x)
            channels.append(x.shape[1])
    backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=channels[1:], out_channels=fpn_channels)
    # the scenes' garments are 18-32 px: anchors from 8 to 64 px, one size per pyramid level (+ the pool level)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    return FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
                      box_head=TwoMLPHead(fpn_channels * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
                      min_size=image_size, max_size=image_size, image_mean=meta["mean"], image_std=meta["std"],
                      # a few objects per small image: far fewer proposals than COCO's 2000 per image
                      rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=150,
                      rpn_post_nms_top_n_test=100, box_batch_size_per_image=128, box_detections_per_img=20)


class ViTPyramid(nn.Module):
    """A timm ViT export as multi-scale maps: the last block's patch tokens (``forward_intermediates``)
    at strides p/2, p, 2p (ViTDet's simple feature pyramid: a transposed convolution, the map, a
    max-pool), each projected to ``out_channels``. ``out_channels`` names the width for a neck."""

    def __init__(self, vit: nn.Module, out_channels: int = 64):
        super().__init__()
        self.vit = vit
        d = vit.embed_dim
        self.up = nn.ConvTranspose2d(d, d, 2, stride=2)
        self.proj = nn.ModuleList(nn.Conv2d(d, out_channels, 1) for _ in range(3))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        (tokens,) = self.vit.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)  # B×D×h×w
        maps = (self.up(tokens), tokens, F.max_pool2d(tokens, 2))
        return OrderedDict((str(i), proj(m)) for i, (proj, m) in enumerate(zip(self.proj, maps)))


def vit_pyramid(export_file: str, out_channels: int = 64) -> ViTPyramid:
    """The timm model of a ``--format timm`` export (strict load) behind a simple feature pyramid."""
    import timm
    meta = read_metadata(export_file)
    vit = timm.create_model(meta["timm"]["name"], pretrained=False, **meta["timm"]["kwargs"])
    vit.load_state_dict(load_file(export_file), strict=True)
    return ViTPyramid(vit, out_channels)


def scene_targets(data, idx: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Images (float in [0, 1]) and torchvision detection targets of the scenes ``idx``."""
    images = [data.images[i].float() / 255 for i in idx]
    targets = [{"boxes": data.boxes[i][:, :4], "labels": data.boxes[i][:, 4].long()} for i in idx]
    return images, targets


def train(model: FasterRCNN, data, steps: int, batch_size: int = 8, lr: float = 0.01, seed: int = 0,
          log_every: int = 0) -> list[float]:
    """SGD on the scenes' boxes; returns the summed detection loss of every step."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        images, targets = scene_targets(data, idx)
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.3f}")
    return losses


@torch.no_grad()
def recall_at_half_iou(model: FasterRCNN, data, n: int = 200, score: float = 0.5) -> float:
    """The share of true boxes of the first ``n`` scenes found by a prediction of the right class
    with IoU >= 0.5 and a score >= ``score`` (a plain check, not COCO mAP)."""
    from torchvision.ops import box_iou
    model.eval()
    found = total = 0
    for i in range(0, n, 16):
        images, targets = scene_targets(data, torch.arange(i, min(i + 16, n)))
        for out, t in zip(model(images), targets):
            keep = out["scores"] >= score
            iou = box_iou(t["boxes"], out["boxes"][keep])                        # true × predicted
            same = t["labels"][:, None] == out["labels"][keep][None]
            found += int(((iou >= 0.5) & same).any(1).sum())
            total += len(t["boxes"])
    return found / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="a `selfsight export RUN FILE --format torchvision` file")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    from selfsight.data import build_dataset
    train_set, test_set = build_dataset("fashion-mnist-scenes"), build_dataset("fashion-mnist-scenes:test")
    model = resnet_fpn_detector(args.export, len(train_set.classes), train_set.image_size)
    train(model, train_set, args.steps, lr=args.lr, log_every=50)
    print(f"recall at IoU 0.5 (score >= 0.5) on 200 test scenes: {recall_at_half_iou(model, test_set):.3f}")


if __name__ == "__main__":
    main()
