"""Assembling a run from its config, in the order the parts need each other: the process group,
threads and seeds; the data and its views (the ``auto`` choices said in one line); the loader; the
method and its hooks; memory format, precision, global BatchNorm, FSDP; the optimizer; compiling;
the online probe; DDP. The order is part of the contract: it fixes which random numbers each
part draws, so the same config gives the same run."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from selfsight.augment import resolve_recipe
from selfsight.augment.views import ViewRecipe, auto_views
from selfsight.backbones.factory import resolve_stem
from selfsight.config import RunConfig
from selfsight.data import build_dataset, native_size
from selfsight.data.arraycache import maybe_cache
from selfsight.data.loader import ViewLoader
from selfsight.engine.compile import compile_for_training
from selfsight.engine.online_probe import OnlineProbe, build_online_probe
from selfsight.engine.optim import build_optimizer
from selfsight.engine.sharding import shard_model
from selfsight.methods import Hooks, build_method, hooks_of
from selfsight.nn.distributed import rank, world_size
from selfsight.nn.precision import pick_precision
from selfsight.nn.sync_bn import convert_sync_batchnorm

log = logging.getLogger("selfsight")


@dataclass
class Parts:
    """Everything a run trains with."""
    device: torch.device
    rank: int
    world: int
    dataset: object
    recipe: ViewRecipe
    channels: int
    loader: ViewLoader
    model: nn.Module
    hooks: Hooks
    channels_last: bool
    amp_dtype: torch.dtype | None
    fsdp: bool
    optimizer: torch.optim.Optimizer
    compiled: list
    probe: OnlineProbe | None
    ddp: nn.Module                      # the model, wrapped in DDP under several processes


def setup_distributed() -> torch.device:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def describe_setup(cfg: RunConfig, recipe, native: int, found: str, custom_backbone: bool = False) -> str:
    """The start-up line that says which view size, preset and backbone stem a run takes, and why
    (``auto`` choices are made from the images' typical size ``native``, ``data.native_size``)."""
    v, b = cfg.views, cfg.backbone
    preset = auto_views(native)[0] if v.preset == "auto" else v.preset
    why = [f"views.preset={v.preset}"] + ([f"views.size={v.size}"] if v.size else [])
    net = "a custom backbone" if custom_backbone else b.name
    if not custom_backbone and b.name.startswith("resnet"):
        stem = resolve_stem(b.small_stem, recipe.size)
        net += f" with the {'ImageNet' if stem == 'none' else stem} stem"
        why.append(f"backbone.small_stem={b.small_stem}")
    elif not custom_backbone and b.name.startswith("vit"):
        net += f" with {b.patch_size} px patches ({recipe.size // b.patch_size}x{recipe.size // b.patch_size} tokens)"
        if recipe.size // b.patch_size < 4:
            log.warning("%s px views in %s px patches give only %dx%d tokens: set backbone.patch_size=4 (as the "
                        "bundled *_fashion_mnist ViT recipes) or larger views.size", recipe.size, b.patch_size,
                        recipe.size // b.patch_size, recipe.size // b.patch_size)
    return f"views: preset {preset} at {recipe.size} px, {net} ({', '.join(why)}; the data: {found})"


def _process(cfg: RunConfig) -> tuple[torch.device, int, int]:
    """The process group, torch's threads and seed, deterministic kernels: (device, rank, world)."""
    t = cfg.train
    device = setup_distributed()
    r, world = rank(), world_size()
    if t.threads:
        torch.set_num_threads(t.threads)
    elif world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(t.seed + r)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, r, world


def _data(cfg: RunConfig, dataset, custom_backbone: bool, r: int) -> tuple[object, ViewRecipe, int]:
    """The data source (built from ``data.train`` unless given; ``data.cache`` may turn a folder into
    a memory-mapped array), its view recipe and its channels."""
    source = dataset if dataset is not None else \
        build_dataset(cfg.data.train, cfg.data.root, cfg.data.download, cfg.data.shuffle_buffer)
    channels = getattr(source, "channels", 3)
    native, found = native_size(source)
    recipe = resolve_recipe(cfg.views, native, channels)
    if r == 0:
        log.info("%s", describe_setup(cfg, recipe, native, found, custom_backbone=custom_backbone))
    if dataset is None:         # data.cache: a folder becomes a memory-mapped uint8 array (decoded once)
        source = maybe_cache(source, cfg.data, recipe, channels, progress=cfg.train.progress)
    return source, recipe, channels


def assemble(cfg: RunConfig, run_dir: Path, dataset=None, backbone: nn.Module | None = None) -> Parts:
    """Build every part of a run (module docstring)."""
    t = cfg.train
    device, r, world = _process(cfg)
    source, recipe, channels = _data(cfg, dataset, backbone is not None, r)
    loader = ViewLoader(source, recipe, cfg.data.batch_size, device, r, world, t.seed, cfg.data.workers,
                        cfg.data.device_augment, cfg.data.decode, cfg.data.prefetch)
    model = build_method(cfg, channels, recipe.size, backbone).to(device)
    hooks = hooks_of(model)                         # every call into the method goes through these
    if hooks.make_masker is not None:               # masked image modeling: masks drawn with each batch
        loader.masker = hooks.make_masker()
    channels_last = cfg.backbone.channels_last and backbone is None and cfg.backbone.name.startswith("resnet")
    if channels_last:           # oneDNN (CPU) and cuDNN both run NHWC convolutions faster
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = pick_precision(t.precision, device)
    if world > 1 and cfg.backbone.sync_bn:          # global BN before the optimizer sees the parameters
        model = convert_sync_batchnorm(model, device.type)
        hooks = hooks_of(model)
    fsdp = t.fsdp and world > 1
    if t.fsdp and world == 1:
        log.info("train.fsdp: one process, nothing to shard")
    if fsdp:                    # before the optimizer: it must see the sharded parameters
        shard_model(model, device, amp_dtype)
    optimizer = build_optimizer(model, cfg.optim, device.type, sharded=fsdp, fixed_lr=hooks.fixed_lr())
    compiled = compile_for_training(model, device, world, run_dir) if t.compile else []
    # eval.online_probe: a linear classifier on detached features, outside the model and its optimizer
    probe = build_online_probe(cfg.eval, model, source, device, log)
    ddp = model
    if world > 1 and not fsdp:
        # buffers are not broadcast from rank 0 each step: a MoCo queue is identical on every rank
        # already (gathered keys) and per-process BN statistics are each process's own on purpose
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    return Parts(device, r, world, source, recipe, channels, loader, model, hooks, channels_last, amp_dtype, fsdp,
                 optimizer, compiled, probe, ddp)
