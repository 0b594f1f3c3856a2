"""Distillation from a frozen teacher into any backbone (feature distillation: FitNets, Romero et al.
2015, Eq. 3, a regressor from the student's features to the teacher's; with the "consistent
teaching" of Beyer et al. 2022, Sec. 3: teacher and student see the SAME augmented view; dense
feature matching as in DINOv2's distillation of ViT-g into smaller ViTs, Oquab et al. 2024, Sec. 5).

* teacher: a selfsight run or export (its evaluation backbone), a hub folder, or ``timm:NAME`` /
  ``torchvision:NAME`` with a local weights file (``teacher_weights``) or the library's download
  (``teacher_pretrained``). Frozen, in eval mode, run under no_grad (bf16 autocast where the device
  has native bf16), never in the optimizer and never in the checkpoint: it is loaded at the first
  training step (a run rebuilt for evaluation never needs it).
* the teacher's input is the student's view, un-normalised, matched to the teacher's channels
  (gray -> RGB by repetition), resized to ``teacher_size`` (0 = the size a selfsight teacher was
  trained at, else the view size) and normalised with the teacher's own statistics.
* student: any backbone selfsight trains (ConvNets included). A linear projector (or an MLP with
  ``projector_hidden``) maps its global feature to the teacher's width; where both have spatial
  tokens (``dense=auto``), a second projector maps each student token, and the student's token grid
  is resized (bilinear) to the teacher's before the per-token comparison.
* loss = global_weight·L(P_g(s), t) + dense_weight·mean over the teacher's grid L(P_d(s)_p, t_p), with
  L = 1 − cos (``loss=cosine``) or the squared error to the teacher feature standardised per token
  (LayerNorm without affine, MaskDistill's target normalisation) averaged over channels (``loss=mse``).
* ``cache``: when the views are deterministic (no random crop, flip, colour, blur or solarize; one
  view per image each time), the teacher's features of a view are computed once and reused, keyed
  by the view's bytes: ``memory`` (a dict) or ``disk`` (SQLite in ``cache_dir``, per process, kept
  across runs). The keys read the views back to the host (one wait per step): worth it when the
  teacher is much larger than the student. ``auto`` caches in memory exactly when the views allow
  it; a cache asked for with random views is refused (the teacher would answer for views it never
  saw).

Departures from published recipes are in docs/methods.md ("Distillation"). Evaluation and export
use the STUDENT backbone (the projectors are thrown away).
"""
from __future__ import annotations

import hashlib
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.backbones import build_backbone
from selfsight.backbones.base import Features
from selfsight.backbones.weights import load_starting_weights
from selfsight.config import BackboneConfig, setting
from selfsight.losses.common import fp32_loss, upcast
from selfsight.methods import register_method
from selfsight.nn.distributed import rank
from selfsight.nn.images import to_channels
from selfsight.nn.precision import native_bf16

log = logging.getLogger("selfsight")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DistillParams:
    name: str = "distill"
    teacher: str = ""                 # a selfsight run / export / hub folder, or timm:NAME, torchvision:NAME
    teacher_weights: str = ""         # timm:/torchvision: a local .safetensors/.pth (or selfsight export/run)
    teacher_pretrained: bool = False  # timm:/torchvision: the library's own weights (downloads once)
    teacher_size: int = setting(0, at_least=0)    # teacher input size; 0 = a selfsight teacher's own, else the view's
    teacher_precision: str = setting("auto", choices=("auto", "bf16", "fp32"))   # auto: bf16 where native
    loss: str = setting("cosine", choices=("cosine", "mse"))
    global_weight: float = setting(1.0, at_least=0)
    dense_weight: float = setting(1.0, at_least=0)
    dense: str = setting("auto", choices=("auto", "on", "off"))   # auto: on when both have spatial tokens
    projector_hidden: int = setting(0, at_least=0)  # 0 = linear projectors; else Linear-GELU-Linear
    cache: str = setting("auto", choices=("auto", "none", "memory", "disk"))
    cache_dir: str = ""               # disk cache folder (required for cache=disk)
    teacher_dim: int = setting(0, at_least=0)     # recorded from the teacher at the first build


def _projector(d_in: int, d_out: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def grid_of(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The h×w token grid of an image of height×width with n_tokens tokens (patches or map cells)."""
    h = max(1, round((n_tokens * height / width) ** 0.5))
    w = n_tokens // h
    if h * w != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} tokens on a grid for a {height}×{width} input")
    return h, w


def resize_tokens(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """B×(h·w)×D tokens on grid ``src`` -> B×(h'·w')×D on grid ``dst`` (bilinear, as an image)."""
    if tuple(src) == tuple(dst):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *src)
    x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


@fp32_loss
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """student, teacher: ...×D (projected student, teacher features) -> the mean over all but the last
    dimension of 1 − cos (``cosine``) or of the channel-mean squared error to the teacher feature
    standardised without affine (``mse``). The teacher is detached: no gradient reaches it."""
    s, t = upcast(student), upcast(teacher.detach())
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
    if kind == "mse":
        return (s - F.layer_norm(t, t.shape[-1:], eps=1e-6)).pow(2).mean()
    raise ValueError(f"distill loss must be cosine or mse, got {kind!r}")


def deterministic_views(recipe) -> bool:
    """The views of one image are the same every time: a full-image resize, no flip, colour, blur,
    solarize, and a single view."""
    jitter = recipe.jitter_p > 0 and any(v > 0 for v in recipe.jitter)
    return (tuple(recipe.crop_scale) == (1.0, 1.0) and min(recipe.crop_ratio) <= 1 <= max(recipe.crop_ratio)
            and recipe.flip_p == 0 and not jitter and recipe.gray_p == 0 and recipe.blur_p == 0
            and recipe.solarize_p == 0 and not any(recipe.view_blur_p) and not any(recipe.view_solarize_p)
            and recipe.n_views == 1 and recipe.local_crops == 0)


class Teacher:
    """The frozen teacher and its input adaptation (not an nn.Module: never trained or checkpointed)."""

    def __init__(self, p: DistillParams, channels: int, view_size: int):
        net, meta, source = load_teacher(p, view_size)
        self.net = net.eval().requires_grad_(False)
        self.source = source
        self.channels = int(meta["channels"])
        self.size = p.teacher_size or int(meta["image_size"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)
        self.precision = p.teacher_precision
        with torch.no_grad():
            probe = self.features(torch.zeros(2, channels, view_size, view_size), (0.0,) * channels,
                                  (1.0,) * channels)
        self.dim = int(probe.cls.shape[-1])
        self.grid = grid_of(probe.patch.shape[1], self.size, self.size) if probe.patch is not None else None

    def _stats(self, device: torch.device, mean, std) -> tuple[torch.Tensor, ...]:
        """(view mean, view std, teacher mean, teacher std) as 1×C×1×1 tensors on ``device``, moved
        there once (no upload in later steps)."""
        key = (str(device), tuple(mean), tuple(std))
        if getattr(self, "_stats_key", None) != key:
            self._stats_key = key
            self._stats_on = tuple(t.view(1, -1, 1, 1).to(device) for t in (
                torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), self.mean, self.std))
        return self._stats_on

    def inputs(self, views: torch.Tensor, mean, std) -> torch.Tensor:
        """B×C×H×W student views (normalised with mean, std) -> the teacher's normalised input."""
        v_mean, v_std, t_mean, t_std = self._stats(views.device, mean, std)
        x = views.float() * v_std + v_mean                                                  # in [0, 1]
        if self.channels != views.shape[1]:
            x = to_channels(x, self.channels)                  # gray -> RGB repeated, RGB -> luma
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - t_mean) / t_std

    @torch.no_grad()
    def features(self, views: torch.Tensor, mean, std):
        """B×C×H×W student views -> the teacher's Features (cls B×Dt, patch B×Nt×Dt or None), in the
        views' dtype."""
        param = next(self.net.parameters())
        if param.device != views.device:
            self.net.to(views.device)
        x = self.inputs(views, mean, std).to(param.dtype)
        bf16 = self.precision == "bf16" or (self.precision == "auto" and native_bf16(x.device))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and param.dtype == torch.float32):
            f = self.net.forward_features(x)
        return type(f)(f.cls.to(views.dtype), None if f.patch is None else f.patch.to(views.dtype))


def load_teacher(p: DistillParams, view_size: int):
    """(backbone with forward_features, preprocessing meta, a line saying what it is)."""
    from selfsight.deploy.load import load_backbone      # the teacher: an earlier run or export (ARCHITECTURE.md)
    from selfsight.runs import starting_state            # the teacher's weights file, as backbone.weights reads it
    if not p.teacher:
        raise ValueError("method.teacher: name the teacher (a selfsight run or export folder, a hub folder, or "
                         "timm:NAME / torchvision:NAME with method.teacher_weights=FILE)")
    if p.teacher.startswith(("timm:", "torchvision:")):
        if not (p.teacher_weights or p.teacher_pretrained):
            raise ValueError(f"method.teacher={p.teacher} needs weights: method.teacher_weights=FILE (a local "
                             ".safetensors/.pth) or method.teacher_pretrained=true (downloads)")
        size = p.teacher_size or view_size
        net = build_backbone(BackboneConfig(name=p.teacher), 3, size, pretrained=p.teacher_pretrained)
        what = f"{p.teacher} ({'pretrained' if p.teacher_pretrained else ''}"
        if p.teacher_weights:
            state, origin = starting_state(p.teacher_weights)
            load_starting_weights(net, state, True, "method.teacher_weights")
            what = f"{p.teacher} ({origin['source']}, sha256 {origin['sha256'][:12]}..."
        cfg = getattr(getattr(net, "net", net), "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        meta = {"channels": 3, "image_size": size, "mean": list(mean), "std": list(std)}
        return net, meta, what + ")"
    path = Path(p.teacher)
    if not path.exists():
        raise ValueError(f"method.teacher: {path} does not exist (a selfsight run or export folder, a hub folder, "
                         "or timm:NAME / torchvision:NAME)")
    net, _, meta = load_backbone(path, "cpu", with_meta=True)
    if not hasattr(net, "forward_features") or not hasattr(net, "embed_dim"):
        raise ValueError(f"method.teacher: {path} loads a {type(net).__name__} without selfsight's feature "
                         "contract; export the teacher with selfsight export (safetensors) or name it timm:NAME "
                         "with method.teacher_weights")
    return net, meta, f"{path} ({meta.get('method')}/{meta.get('backbone')})"


class TeacherCache:
    """Teacher features by the bytes of the view they were computed from (deterministic views only)."""

    def __init__(self, kind: str, folder: str):
        self.kind, self.memory, self.db, self.hits, self.misses = kind, {}, None, 0, 0
        if kind == "disk":
            if not folder:
                raise ValueError("method.cache=disk needs method.cache_dir=FOLDER")
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(Path(folder) / f"teacher_rank{rank()}.sqlite"))
            self.db.execute("CREATE TABLE IF NOT EXISTS f (key BLOB PRIMARY KEY, cls BLOB, patch BLOB, shape TEXT)")

    @staticmethod
    def keys(views: torch.Tensor) -> list[bytes]:
        arr = views.detach().to("cpu", torch.float32).numpy()
        return [hashlib.blake2b(a.tobytes(), digest_size=16).digest() for a in arr]

    def get(self, key: bytes):
        if self.db is None:
            return self.memory.get(key)
        row = self.db.execute("SELECT cls, patch, shape FROM f WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        cls = torch.from_numpy(np.frombuffer(row[0], dtype=np.float16).copy())
        patch = None
        if row[1] is not None:
            patch = torch.from_numpy(np.frombuffer(row[1], dtype=np.float16).copy()).view(*map(int, row[2].split(",")))
        return cls, patch

    def put(self, key: bytes, cls: torch.Tensor, patch: torch.Tensor | None) -> tuple:
        """Store one view's features (fp16, on the host) and return them as stored."""
        cls, patch = cls.half().cpu(), None if patch is None else patch.half().cpu()
        if self.db is None:
            self.memory[key] = (cls, patch)
        else:
            self.db.execute("INSERT OR REPLACE INTO f VALUES (?, ?, ?, ?)", (
                key, cls.numpy().tobytes(), None if patch is None else patch.numpy().tobytes(),
                "" if patch is None else ",".join(map(str, patch.shape))))
        return cls, patch

    def commit(self) -> None:
        if self.db is not None:
            self.db.commit()


class Distill(nn.Module):
    def __init__(self, params: DistillParams, backbone: nn.Module, channels: int = 3, image_size: int = 32):
        super().__init__()
        p = self.params = params
        self.student = backbone
        self.channels, self.image_size = channels, image_size
        self._teacher: Teacher | None = None
        self._cache: TeacherCache | None = None
        if not p.teacher_dim or p.dense == "auto":           # a new run: learn the teacher's shape now
            t = self.teacher()
            p.teacher_dim = t.dim
            was = backbone.training
            with torch.no_grad():                            # eval: no BN statistics touched
                student_dense = backbone.eval().forward_features(torch.zeros(2, channels, image_size,
                                                                             image_size)).patch
            backbone.train(was)
            if p.dense == "auto":
                p.dense = "on" if t.grid is not None and student_dense is not None and p.dense_weight > 0 else "off"
            elif p.dense == "on" and (t.grid is None or student_dense is None):
                raise ValueError("method.dense=on: the teacher and the student both need spatial tokens "
                                 f"(teacher {'has' if t.grid else 'has none'}, student "
                                 f"{'has' if student_dense is not None else 'has none'})")
        self.projector = _projector(backbone.embed_dim, p.teacher_dim, p.projector_hidden)
        self.dense_projector = _projector(backbone.embed_dim, p.teacher_dim, p.projector_hidden) \
            if p.dense == "on" else None

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the student."""
        return self.student

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = Teacher(self.params, self.channels, self.image_size)
            t = self._teacher
            log.info("distill: teacher %s: %d-d features%s at %d px", t.source, t.dim,
                     f", {t.grid[0]}x{t.grid[1]} tokens" if t.grid else " (no spatial tokens)", t.size)
        return self._teacher

    def set_views(self, recipe) -> None:
        """Called by ``build`` with the run's view recipe: the normalisation and the cache decision."""
        self.view_mean, self.view_std = tuple(recipe.mean), tuple(recipe.std)
        fixed, kind = deterministic_views(recipe), self.params.cache
        if kind in ("memory", "disk") and not fixed:
            raise ValueError(f"method.cache={kind}: the views are random (crops, flips, colour...), so the teacher "
                             "must see each new view; cache only with deterministic views (views.n_views=1, "
                             "views.crop_scale=[1, 1], views.flip_p=0, views.jitter_p=0, views.gray_p=0, "
                             "views.blur_p=0, views.solarize_p=0) or set method.cache=none")
        if kind == "auto":
            kind = "memory" if fixed else "none"
        self._cache = TeacherCache(kind, self.params.cache_dir) if kind != "none" else None

    def _teacher_features(self, x: torch.Tensor):
        mean, std = getattr(self, "view_mean", (0.5,) * x.shape[1]), getattr(self, "view_std", (0.5,) * x.shape[1])
        if self._cache is None:
            return self.teacher().features(x, mean, std)
        keys = self._cache.keys(x)
        found = [self._cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            f = self.teacher().features(x[missing], mean, std)
            for j, i in enumerate(missing):      # the stored (fp16) values: the same targets every epoch
                found[i] = self._cache.put(keys[i], f.cls[j], None if f.patch is None else f.patch[j])
            self._cache.commit()
        self._cache.hits += len(keys) - len(missing)
        self._cache.misses += len(missing)
        # stored fp16 on the host; widened before stacking (CPU autocast refuses fp16 in its promote list)
        cls = torch.stack([c.to(x.dtype) for c, _ in found]).to(x.device)
        patch = None if found[0][1] is None else torch.stack([q.to(x.dtype) for _, q in found]).to(x.device)
        return Features(cls, patch)

    def training_step(self, batch: dict, sched: dict) -> dict:
        p = self.params
        x = torch.cat(batch["views"])                                           # (V·B)×C×H×W, every view a sample
        s = self.student.forward_features(x)                                    # cls (V·B)×Ds, patch (V·B)×Ns×Ds
        t = self._teacher_features(x)                                           # cls (V·B)×Dt, patch (V·B)×Nt×Dt
        loss_global = distill_loss(self.projector(s.cls), t.cls, p.loss)
        loss = p.global_weight * loss_global
        monitor = {"distill_global_loss": loss_global.detach()}
        if self.dense_projector is not None:
            t_grid = grid_of(t.patch.shape[1], x.shape[-2], x.shape[-1])
            s_grid = grid_of(s.patch.shape[1], x.shape[-2], x.shape[-1])
            dense = resize_tokens(self.dense_projector(s.patch), s_grid, t_grid)   # (V·B)×Nt×Dt
            loss_dense = distill_loss(dense, t.patch, p.loss)
            loss = loss + p.dense_weight * loss_dense
            monitor["distill_dense_loss"] = loss_dense.detach()
        if self._cache is not None:
            monitor["distill_cache_hit_rate"] = self._cache.hits / max(1, self._cache.hits + self._cache.misses)
        b = batch["views"][0].shape[0]
        return {"loss": loss, "embedding": s.cls[:b].detach(), "monitor": monitor}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


def teacher_named(cfg):
    """A ``check``: the teacher must be named before anything is built."""
    t = cfg.method.teacher
    if not t:
        return ("method.teacher", "must name the teacher: a selfsight run or export folder, a hub folder, or "
                "timm:NAME / torchvision:NAME with method.teacher_weights=FILE", "")
    if not t.startswith(("timm:", "torchvision:")) and not Path(t).exists():
        return ("method.teacher", "names no file or folder (a selfsight run or export, a hub folder, or "
                "timm:NAME / torchvision:NAME)", t)
    return None


register_method(
    "distill", DistillParams, check=teacher_named,
    # our defaults (docs/methods.md, "Distillation"): AdamW 1e-3·B/256 with a 5 % warm-up and a cosine to
    # 1e-6, wd 0.05, global clipping at 3; one view per image, BYOL's augmentations (the teacher sees it too)
    defaults={"optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 0.05, "warmup_fraction": 0.05, "min_lr": 1e-6, "clip_grad": 3.0},
              "views": {"n_views": 1}},
    summary="distill: a frozen teacher (run, export or timm model) into any backbone, global and dense features",
    input_shape=True,
)(Distill)
