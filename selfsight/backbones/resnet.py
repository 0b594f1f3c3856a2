"""torchvision ResNets (He et al. 2016) without their classifier, with small-image stems."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from selfsight.backbones.base import Features
from selfsight.nn.checkpointing import checkpointed

STEMS = ("none", "cifar", "s2")


DEPTHS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
          "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def make_resnet(name: str, width: int = 64, zero_init_residual: bool = False) -> torchvision.models.ResNet:
    """A torchvision ``ResNet`` of the given depth whose stages have ``width·(1, 2, 4, 8)`` channels.

    ``width=64`` is exactly ``torchvision.models.resnetXX()``. Other widths build the same
    module tree from torchvision's own blocks (the state-dict keys stay torchvision's), as
    narrow ResNets are the fast choice for 28-32 px images on small hardware.
    """
    kind, layers = DEPTHS[name]
    block = torchvision.models.resnet.BasicBlock if kind == "basic" else torchvision.models.resnet.Bottleneck
    net = torchvision.models.resnet.ResNet(block, layers, zero_init_residual=zero_init_residual)
    if width == 64:
        return net
    # same constructor logic with other widths: rebuild the stem and stages, re-run torchvision's init
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
    net.fc = nn.Linear(8 * width * block.expansion, 1000)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)
    return net


class ResNetBackbone(nn.Module):
    """torchvision ``resnet10/18/34/50`` body; the pooled last stage is the representation.

    ``small_stem``: ``none`` keeps the ImageNet stem (7x7 s2 conv + max-pool); ``cifar``
    uses a 3x3 s1 conv and no max-pool (SimCLR CIFAR, methods.md §0.1); ``s2`` a 3x3 s2
    conv and no max-pool (for 28-32 px images: 4x cheaper than ``cifar``, 4x the
    resolution of the ImageNet stem). The torchvision module is kept as ``self.net`` so
    its state dict maps one to one onto ``torchvision.models.resnetXX()``. ``grad_checkpointing``:
    each of the four stages keeps only its input for backward (``nn.checkpointing``).
    """

    def __init__(self, name: str = "resnet18", in_chans: int = 3, small_stem: str = "none",
                 zero_init_residual: bool = False, width: int = 64, grad_checkpointing: bool = False):
        super().__init__()
        if small_stem not in STEMS:
            raise ValueError(f"small_stem must be one of {STEMS}, got {small_stem!r}")
        net = make_resnet(name, width, zero_init_residual)
        if small_stem != "none":
            net.conv1 = nn.Conv2d(in_chans, width, 3, stride=1 if small_stem == "cifar" else 2, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        if small_stem != "none" or in_chans != 3:
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.name = name
        self.grad_checkpointing = grad_checkpointing

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Features:
        if mask is not None:
            raise ValueError("ResNet backbones do not take a patch mask (only ViT backbones do)")
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for stage in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = checkpointed(stage, stage, x) if self.grad_checkpointing else stage(x)
        # x: B×D×h×w
        return Features(x.mean((2, 3)), x.flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls
