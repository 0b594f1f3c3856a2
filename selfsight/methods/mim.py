"""Masked image modeling as one composable method: the unified view of Peng et al. 2022
(arXiv 2210.10615, methods.md §14),

    L_MIM = mean_{i ∈ M} Loss( N(T(x))_i , H(S(x̃))_i ),

with a teacher T (``targets``: pixels, HOG, frozen or EMA teacher features, tokenizer ids), a
normalization N (none, per-patch norm-pix, LayerNorm without affine, L2), a student S (a
timm ViT fed mask tokens — dense — or only the visible patches — sparse), a MIM head H
(linear, MLP or MAE's decoder) and a loss on the masked positions M only (l2, l1, smooth-l1,
cosine, cross-entropy). MAE, MaskFeat and MaskDistill are registered presets of this one
method (``mae``, ``maskfeat``, ``maskdistill``); ``mim`` is the same method for compositions
written in YAML.

Masks come with the batch (``batch["masks"]``, drawn by ``masking.ViewMasker`` when the loader
assembles it); the teacher sees the intact view, the student the masked one.

Optional global term (``global_term.kind: contrastive``): vanilla MIM learns no global image
representation (methods.md §14), so the class tokens of two masked views go through a
SimCLR projector and NT-Xent (Chen et al. 2020a, Eq. 1), weighted and added to the MIM loss.
With the sparse encoder this costs one projector pass: the class token already attends to the
visible patches. (iBOT's DINO term on the class token comes with iBOT.)

Deviation: MaskDistill's student uses BEiT's shared relative position bias and LayerScale; the
``maskdistill`` preset keeps absolute position embeddings and no LayerScale (both are backbone
options, on in the ``beit``/``beitv2`` presets; docs/mim.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision.utils as vutils

from selfsight.augment.views import default_normalization
from selfsight.config import setting, unit_range
from selfsight.heads import ProjectionMLP
from selfsight.heads.aggregation import PatchAggregation
from selfsight.heads.mim import build_mim_head
from selfsight.losses.mim import mim_loss
from selfsight.losses.nt_xent import nt_xent
from selfsight.masking.views import ViewMasker, build_masker
from selfsight.methods import register_method, vit_only
from selfsight.nn.momentum import momentum_copy, momentum_update, without_drop_path
from selfsight.targets import build_target, normalize_target, patchify, unpatchify


@dataclass
class MaskParams:
    kind: str = "random"              # random (MAE: per-sample argsort) | block (BEiT: block-wise)
    ratio: float = setting(0.75, unit=True)
    ratio_range: tuple = setting((), check=unit_range)          # [lo, hi]: per-image ratio ~ U(lo, hi) (iBOT)
    unmasked_share: float = setting(0.0, unit=True)      # share of images left unmasked (iBOT 0.5)
    min_patches: int = setting(0, at_least=0)             # block: minimum patches per block; 0 = target // 5 (MaskFeat)
    max_patches: int = setting(0, at_least=0)             # block: 0 = no cap
    aspect: tuple = (0.3, 1 / 0.3)    # block: aspect-ratio range (log-uniform)
    views: tuple = ()                 # views that get a mask; [] = the first 1 (2 with a global term)


@dataclass
class TargetParams:
    kind: str = "pixels"              # pixels | hog | teacher | ema | tokens
    norm: str = "patch"               # none | patch (MAE norm-pix) | layernorm (no affine) | l2
    hog_bins: int = setting(9, at_least=1)
    hog_cell: int = setting(8, at_least=1)                # HOG cell side in pixels (MaskFeat: 8 px cells, 16 px patches)
    teacher: str = ""                 # teacher: a selfsight run/checkpoint, or timm:NAME / torchvision:NAME
    teacher_weights: str = ""         # local weights file for timm:/torchvision: teachers
    teacher_size: int = setting(0, at_least=0)            # teacher input side; 0 = the view's
    teacher_dim: int = setting(0, at_least=0)             # filled in from the teacher (lets a run be rebuilt without its file)
    momentum: float = setting(0.999, unit=True)          # ema: teacher momentum, cosine to momentum_end per step
    momentum_end: float = setting(1.0, unit=True)
    tokenizer: str = ""               # tokens: path of a tokenizer artifact


@dataclass
class HeadParams:
    kind: str = "decoder"             # linear | mlp | decoder (MAE)
    hidden_dim: int = setting(2048, at_least=1)           # mlp
    decoder_dim: int = setting(512, at_least=1)
    decoder_depth: int = setting(8, at_least=0)
    decoder_heads: int = setting(16, at_least=1)
    aggregation_layer: int = setting(0, at_least=0)       # BEiT v2 patch aggregation: early layer l (0 = off; ViT-B: 9)
    aggregation_depth: int = setting(2, at_least=0)       # extra blocks of the aggregation branch


@dataclass
class GlobalParams:
    kind: str = "none"                # none | contrastive (NT-Xent on the class tokens of 2 masked views)
    weight: float = setting(1.0, at_least=0)
    temperature: float = setting(0.2, above=0)
    hidden_dim: int = setting(2048, at_least=1)
    dim: int = setting(128, at_least=1)


@dataclass
class MIMParams:
    name: str = "mim"
    student_input: str = "sparse"     # sparse (MAE: masked patches dropped) | dense (mask tokens)
    loss: str = "l2"                  # l2 | l1 | smooth_l1 | cosine | ce
    smooth_l1_beta: float = setting(1.0, at_least=0)
    mask: MaskParams = field(default_factory=MaskParams)
    target: TargetParams = field(default_factory=TargetParams)
    head: HeadParams = field(default_factory=HeadParams)
    global_term: GlobalParams = field(default_factory=GlobalParams)


class MIM(nn.Module):
    def __init__(self, params: MIMParams, backbone: nn.Module):
        super().__init__()
        p = self.params = params
        if not hasattr(backbone, "enable_masking"):
            raise ValueError(f"{p.name} needs a ViT backbone (backbone.name: vit_tiny, vit_small or vit_base)")
        if p.student_input not in ("sparse", "dense"):
            raise ValueError(f"method.student_input must be sparse or dense, got {p.student_input!r}")
        if p.student_input == "sparse" and (p.mask.kind != "random" or p.mask.ratio_range or p.mask.unmasked_share):
            raise ValueError("method.student_input=sparse drops the masked patches and needs the same number in "
                             "every image: use method.mask.kind=random with a fixed ratio (or student_input=dense)")
        if p.global_term.kind not in ("none", "contrastive"):
            raise ValueError(f"method.global_term.kind must be none or contrastive, got {p.global_term.kind!r}")
        backbone.enable_masking("drop" if p.student_input == "sparse" else "token")
        self.student = backbone
        self.patch_size = backbone.patch_size
        self.channels = backbone.net.patch_embed.proj.in_channels
        mean, std = default_normalization(self.channels)
        self.preprocess = {"mean": list(mean), "std": list(std)}
        self.teacher = without_drop_path(momentum_copy(backbone)) if p.target.kind == "ema" else None
        self.target = build_target(p.target, backbone, self.preprocess, self.teacher)
        if self.target.discrete != (p.loss == "ce"):
            raise ValueError(f"method.loss={p.loss!r} does not fit method.target.kind={p.target.kind!r}: "
                             "token ids need loss ce, continuous targets l2, l1, smooth_l1 or cosine")
        h = p.head
        self.head = build_mim_head(h.kind, backbone.embed_dim, self.target.dim, h.hidden_dim, h.decoder_dim,
                                   h.decoder_depth, h.decoder_heads)
        self.aggregation = None
        if h.aggregation_layer:
            if p.student_input != "dense":
                raise ValueError("method.head.aggregation_layer (BEiT v2's patch aggregation) needs the dense "
                                 "student input: method.student_input=dense")
            self.aggregation = PatchAggregation(backbone, h.aggregation_layer, h.aggregation_depth)
        g = p.global_term
        self.projector = ProjectionMLP(backbone.embed_dim, g.hidden_dim, g.dim, 2, last_bn="scale") \
            if g.kind == "contrastive" else None
        n_masked = 2 if g.kind == "contrastive" else 1
        self.masked_views = tuple(p.mask.views) or tuple(range(n_masked))
        self.masker = build_masker(p.mask, self.patch_size, self.masked_views)

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def make_masker(self) -> ViewMasker:
        """The loader draws the masks with this when it assembles a batch."""
        return self.masker

    def schedules(self) -> dict:
        t = self.params.target
        return {"momentum": (t.momentum, t.momentum_end)} if self.teacher is not None else {}

    def after_step(self, sched: dict) -> None:
        if self.teacher is not None:
            momentum_update(self.teacher, self.student, sched.get("momentum", self.params.target.momentum),
                            sched.get("finite"))

    def _masks(self, batch: dict) -> list:
        masks = batch.get("masks")
        if masks is None:                          # a batch built outside the loader
            masks = self.masker(batch["views"], int(batch.get("seed", 0)))
        return masks

    def encode(self, x: torch.Tensor, mask: torch.Tensor, aggregate: bool = False) -> tuple:
        """Student on the masked view -> (head predictions, class token, mean of the patch tokens
        the student saw, patch grid, predictions of the aggregation branch or None)."""
        grid = self.masker.grid(x.shape[-2:])
        states, handles = self.aggregation.capture(self.student) if aggregate else ({}, [])
        try:
            # the visible count, when the masker fixes it, lets a sparse student gather without a host read
            visible = self.masker.generator.visible(grid[0] * grid[1])
            kw = {} if visible is None else {"visible": visible}
            feats = self.student.forward_features(x, mask, **kw)               # cls B×D, patch B×(N|Nv)×D
        finally:
            for h in handles:
                h.remove()
        pred = self.head(feats.cls, feats.patch, mask, grid)
        agg = None
        if aggregate:                                                            # shared final norm and head
            net, bias = self.student.net, getattr(self.student, "rel_pos_bias", None)
            bias = bias.get_bias().to(states["early"].dtype) if bias is not None else None
            s = net.norm(self.aggregation(states, net.num_prefix_tokens, bias))  # B×(prefix+N)×D
            agg = self.head(s[:, 0], s[:, net.num_prefix_tokens:], mask, grid)   # registers are no patches
        return pred, feats.cls, feats.patch.mean(1), grid, agg

    def _masked_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every head predicts every position (B×N×...); the loss counts the masked ones."""
        return mim_loss(pred, target, mask, self.params.loss, self.params.smooth_l1_beta)

    def training_step(self, batch: dict, sched: dict) -> dict:
        views, masks = batch["views"], self._masks(batch)
        idx = self.masked_views
        if len(views) <= max(idx):
            raise ValueError(f"{self.params.name} masks views {list(idx)} but the batch has {len(views)} "
                             f"(views.n_views: {max(idx) + 1})")
        x = torch.cat([views[i] for i in idx])                                  # (V·B)×C×H×W
        mask = torch.cat([masks[i] for i in idx])                               # (V·B)×N
        pred, cls, patch_mean, grid, agg = self.encode(x, mask, self.aggregation is not None)
        with torch.no_grad():
            target = self.target(x, grid)                                        # (V·B)×N×dim | ids
            if not self.target.discrete:
                target = normalize_target(target, self.params.target.norm)
        loss = self._masked_loss(pred, target, mask)
        monitor = {"mim_loss": loss.detach(), "mask_ratio": mask.float().mean()}
        if agg is not None:                                                      # BEiT v2: same targets, summed
            agg_loss = self._masked_loss(agg, target, mask)
            monitor["aggregation_loss"] = agg_loss.detach()
            loss = loss + agg_loss
        if self.projector is not None:
            z1, z2 = self.projector(cls).chunk(2)
            g = nt_xent(z1, z2, self.params.global_term.temperature, reduction="mean2n")
            monitor["global_loss"] = g.detach()
            loss = loss + self.params.global_term.weight * g
        b = views[0].shape[0]
        # the monitored embedding is the mean patch token: MIM trains the class token only weakly
        return {"loss": loss, "embedding": patch_mean[:b].detach(), "monitor": monitor}

    @torch.no_grad()
    def pictures(self, batch: dict, n: int = 8) -> dict:
        """{"mim_masks": image}: rows of input | masked input (gray patches) [| reconstruction |
        reconstruction with the visible patches pasted] for ``n`` images of the first masked view,
        in [0, 1]. With norm-pix targets the prediction is de-normalized with the TRUE patch
        mean and variance, for display only: that leaks the masked patches' statistics into
        the picture (methods.md pitfall 17)."""
        i = self.masked_views[0]
        x, mask = batch["views"][i][:n].float(), self._masks(batch)[i][:n]
        was = self.training
        self.eval()
        pred, _, _, grid, _ = self.encode(x, mask)
        self.train(was)
        mean = x.new_tensor(self.preprocess["mean"]).view(1, -1, 1, 1)
        std = x.new_tensor(self.preprocess["std"]).view(1, -1, 1, 1)
        p, c = self.patch_size, self.channels
        cells = mask[..., None].float().expand(-1, -1, p * p * c)
        to_image = lambda t: unpatchify(t, p, grid, c)                          # noqa: E731
        patches = patchify(x, p)
        gray = ((0.5 - mean) / std).flatten().repeat(p * p)                      # channel-last inside a patch
        masked_in = to_image(patches * (1 - cells) + cells * gray)
        cols = [x, masked_in]
        if self.params.target.kind == "pixels" and pred.shape[:2] == mask.shape:
            rec = pred.float()
            if self.params.target.norm == "patch":          # display only: true patch statistics
                rec = rec * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
            cols += [to_image(rec), to_image(rec * cells + patches * (1 - cells))]
        grid_img = torch.stack(cols, 1).flatten(0, 1) * std + mean               # (n·cols)×C×H×W
        grid_img = grid_img.clamp(0, 1)
        if grid_img.shape[-1] < 64:                                              # small images: enlarge (nearest)
            grid_img = nn.functional.interpolate(grid_img, scale_factor=64 // grid_img.shape[-1], mode="nearest")
        if c == 1:
            grid_img = grid_img.expand(-1, 3, -1, -1)
        return {"mim_masks": vutils.make_grid(grid_img, nrow=len(cols), padding=2, pad_value=1.0)}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


# --- presets: the papers' recipes as defaults of the one method ------------------------------

_MAE = {"student_input": "sparse", "loss": "l2",
        "mask": {"kind": "random", "ratio": 0.75},
        "target": {"kind": "pixels", "norm": "patch"},
        "head": {"kind": "decoder", "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}}
_NO_COLOR = {"n_views": 1, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0,
             "view_blur_p": [], "view_solarize_p": [], "local_crops": 0}
# MAE (He et al. 2022; PRETRAIN.md): AdamW (0.9, 0.95) blr 1.5e-4·B/256, wd 0.05, 40 warm-up
# epochs, cosine to 0, no clipping; crop 0.2-1 + flip only; fixed sin-cos position embedding.
_MAE_DEFAULTS = {
    "method": _MAE,
    "optim": {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "base_batch": 256, "betas": [0.9, 0.95],
              "weight_decay": 0.05, "warmup_epochs": 40, "min_lr": 0.0, "clip_grad": 0.0},
    "backbone": {"name": "vit_base", "pos_embed": "sincos", "drop_path": 0.0},
    "views": {**_NO_COLOR, "crop_scale": [0.2, 1.0]}}
# MaskFeat (Wei et al. 2022; SlowFast in1k_VIT_B_MaskFeat_PT.yaml): block masking 40 %, HOG
# (9 bins, 8 px cells), linear head, MSE; AdamW 2e-4·B/256, wd 0.05, warm-up 30, cosine to 1e-6,
# clip 0.02; crop 0.5-1 + flip, no colour.
_MASKFEAT_DEFAULTS = {
    "method": {"student_input": "dense", "loss": "l2", "mask": {"kind": "block", "ratio": 0.4},
               "target": {"kind": "hog", "norm": "none"}, "head": {"kind": "linear"}},
    "optim": {"name": "adamw", "lr": 2e-4, "lr_scaling": "linear", "base_batch": 256, "betas": [0.9, 0.999],
              "weight_decay": 0.05, "warmup_epochs": 30, "min_lr": 1e-6, "clip_grad": 0.02},
    "backbone": {"name": "vit_base", "drop_path": 0.0},
    "views": {**_NO_COLOR, "crop_scale": [0.5, 1.0]}}
# MaskDistill (Peng et al. 2022, via the reproductions in methods.md §14): block masking 40 %,
# frozen teacher on the intact view, LayerNorm-without-affine targets, linear head, smooth-l1;
# AdamW 1.5e-3 at B 2048, wd 0.05, warm-up 10, cosine to 1e-5, clip 3; crop 0.2-1, flip,
# colour jitter 0.4; drop-path 0.1.
_MASKDISTILL_DEFAULTS = {
    "method": {"student_input": "dense", "loss": "smooth_l1", "mask": {"kind": "block", "ratio": 0.4},
               "target": {"kind": "teacher", "norm": "layernorm"}, "head": {"kind": "linear"}},
    "optim": {"name": "adamw", "lr": 1.5e-3, "lr_scaling": "linear", "base_batch": 2048, "betas": [0.9, 0.999],
              "weight_decay": 0.05, "warmup_epochs": 10, "min_lr": 1e-5, "clip_grad": 3.0},
    "backbone": {"name": "vit_base", "drop_path": 0.1},
    "views": {**_NO_COLOR, "crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.0], "jitter_p": 1.0}}

# BEiT (Bao et al. 2022, methods.md §11; beit/run_beit_pretraining.py, README): block masking
# 40 % (min 16 patches per block at 14×14), mask tokens, linear head to the tokenizer's vocabulary,
# cross-entropy on the masked positions; the tokenizer sees the same crop at its own size and
# normalization. AdamW 1.5e-3 at B 2048, wd 0.05, warm-up 10, cosine to 1e-5, clip 3, drop-path
# 0.1, LayerScale 0.1, shared relative position bias without absolute position embeddings; colour
# jitter 0.4 always, flip, crop 0.08-1.
_BEIT_DEFAULTS = {
    "method": {"student_input": "dense", "loss": "ce", "mask": {"kind": "block", "ratio": 0.4, "min_patches": 16},
               "target": {"kind": "tokens", "norm": "none"}, "head": {"kind": "linear"}},
    "optim": {"name": "adamw", "lr": 1.5e-3, "lr_scaling": "linear", "base_batch": 2048, "betas": [0.9, 0.999],
              "weight_decay": 0.05, "warmup_epochs": 10, "min_lr": 1e-5, "clip_grad": 3.0},
    "backbone": {"name": "vit_base", "drop_path": 0.1, "layer_scale": 0.1, "rel_pos_bias": True, "pos_embed": "none"},
    "views": {**_NO_COLOR, "crop_scale": [0.08, 1.0], "jitter": [0.4, 0.4, 0.4, 0.0], "jitter_p": 1.0}}
# BEiT v2 (Peng et al. 2022a, methods.md §12.2): the same with VQ-KD ids as targets, crop 0.2-1,
# and the patch-aggregation branch (final class token + the patch tokens of layer 9 of 12 through 2
# extra blocks, the shared head, a second cross-entropy; heads/aggregation.py).
_BEITV2_DEFAULTS = {**_BEIT_DEFAULTS,
                    "method": {**_BEIT_DEFAULTS["method"],
                               "head": {"kind": "linear", "aggregation_layer": 9, "aggregation_depth": 2}},
                    "views": {**_BEIT_DEFAULTS["views"], "crop_scale": [0.2, 1.0]}}

for _name, _defaults, _summary in (
        ("mim", _MAE_DEFAULTS, "masked image modeling composed from YAML: target, normalization, student input, "
                               "head, loss (defaults: MAE's)"),
        ("mae", _MAE_DEFAULTS, "MAE: sparse encoder on 25 % visible patches, decoder, norm-pix MSE on masked patches"),
        ("maskfeat", _MASKFEAT_DEFAULTS, "MaskFeat: mask tokens, block masking 40 %, linear head regressing HOG"),
        ("maskdistill", _MASKDISTILL_DEFAULTS, "MaskDistill: mask tokens, block masking 40 %, smooth-l1 to "
                                               "LayerNorm-ed frozen-teacher features"),
        ("beit", _BEIT_DEFAULTS, "BEiT: mask tokens, block masking 40 %, linear head, cross-entropy to the ids "
                                 "of a tokenizer (selfsight tokenizer train)"),
        ("beitv2", _BEITV2_DEFAULTS, "BEiT v2: BEiT with the ids of a VQ-KD tokenizer (tokenizer train --kind vqkd)")):
    register_method(_name, MIMParams, defaults=_defaults, summary=_summary, check=vit_only)(MIM)
