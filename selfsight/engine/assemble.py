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
from selfsight.backbones import build_backbone
from selfsight.backbones.factory import resolve_stem
from selfsight.backbones.hub import first_line, is_convnet, total_stride
from selfsight.backbones.weights import freeze, load_starting_weights, state_sha256
from selfsight.config import RunConfig
from selfsight.data import build_dataset, native_size
from selfsight.data.arraycache import maybe_cache
from selfsight.data.loader import ViewLoader
from selfsight.engine.compile import compile_for_training
from selfsight.engine.online_probe import OnlineProbe, build_online_probe
from selfsight.engine.optim import backbone_lr_scales, build_optimizer
from selfsight.engine.sharding import shard_model
from selfsight.methods import Hooks, build_method, hooks_of
from selfsight.nn.distributed import rank, world_size
from selfsight.nn.precision import grad_scaler, pick_precision
from selfsight.nn.sync_bn import convert_sync_batchnorm
from selfsight.runs import starting_state

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
    starting: dict | None = None        # where the backbone's starting weights came from (None: random init)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (None in bf16 and fp32)


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
        build_dataset(cfg.data.train, cfg.data.root, cfg.data.download, cfg.data.shuffle_buffer,
                      image_column=cfg.data.image_column, label_column=cfg.data.label_column)
    channels = getattr(source, "channels", 3)
    native, found = native_size(source)
    recipe = resolve_recipe(cfg.views, native, channels)
    if r == 0:
        log.info("%s", describe_setup(cfg, recipe, native, found, custom_backbone=custom_backbone))
    if dataset is None:         # data.cache: a folder becomes a memory-mapped uint8 array (decoded once)
        source = maybe_cache(source, cfg.data, recipe, channels, progress=cfg.train.progress)
    return source, recipe, channels


def _check_view_sizes(net: nn.Module, name: str, recipe: ViewRecipe, channels: int) -> None:
    """A model from timm, torchvision or a user's factory runs one image of each view size (global,
    and local crops where there are some) before anything trains: a size the architecture cannot
    take (below its total stride, not a multiple of its patch, off its window grid) is one line that
    says which setting to change, not an error deep inside the first step."""
    sizes = [("views.size", recipe.size)] + ([("views.local_size", recipe.local_size)] if recipe.local_crops else [])
    was = net.training
    net.eval()
    try:
        for key, s in sizes:
            try:
                with torch.no_grad():
                    net.forward_features(torch.zeros(1, channels, s, s))
            except (RuntimeError, ValueError, AssertionError) as e:
                fix = ("raise views.local_size or set views.local_crops=0" if key == "views.local_size"
                       else "choose another views.size")
                reason = first_line(e).rstrip(".")
                raise ValueError(f"{name} cannot take {s} px views ({key}={s}): {reason}; {fix}") from None
    finally:
        net.train(was)


def _backbone(cfg: RunConfig, channels: int, recipe: ViewRecipe, custom: nn.Module | None, fresh: bool, r: int):
    """The network the method trains: ``custom`` (any module, from Python), or the one the config
    names, with timm's or torchvision's pretrained weights or ``backbone.weights`` when a new run asks
    for them (a resumed run gets its own), and its frozen stages. Returns it and where its starting
    weights came from (None: random initialisation)."""
    b = cfg.backbone
    if custom is not None:
        return custom, None
    size = recipe.size
    net = build_backbone(b, channels, size, pretrained=fresh and b.pretrained)
    if ":" in b.name:
        _check_view_sizes(net, b.name, recipe, b.in_chans or channels)
    starting = {"source": f"{b.name} ({'timm' if b.name.startswith('timm:') else 'torchvision'}'s pretrained "
                          "weights)"} if fresh and (b.pretrained or b.pretrained_file) else None
    if fresh and b.weights:
        state, starting = starting_state(b.weights)
        starting["report"] = load_starting_weights(net, state, b.weights_strict)
        if r == 0:
            rep = starting["report"]
            log.info("starting weights: %d of %d tensors from %s (%s, sha256 %s...)%s", rep["loaded"], rep["of"],
                     starting["source"], starting["kind"], starting["sha256"][:12],
                     f"; adapted: {', '.join(rep['adapted'])}" if rep["adapted"] else "")
    if starting is not None:                        # what the run starts from, whatever the source
        starting["weights_sha256"] = state_sha256(net.state_dict())
    frozen = freeze(net, b.freeze)
    if frozen and r == 0:
        log.info("backbone.freeze=%s: %d tensors of the backbone get no gradient", b.freeze, frozen)
    stride = total_stride(net, size, b.in_chans or channels)
    if stride and size < 2 * stride and r == 0:
        log.warning("%s px views are less than twice the total stride %d of %s: its last map is %dx%d. Use larger "
                    "views (views.size=%d or more) or a backbone with a small stem (the built-in "
                    "resnet18, whose stem follows the view size)", size, stride, b.name, max(1, size // stride),
                    max(1, size // stride), 2 * stride)
    return net, starting


def assemble(cfg: RunConfig, run_dir: Path, dataset=None, backbone: nn.Module | None = None,
             fresh: bool = True) -> Parts:
    """Build every part of a run (module docstring); ``fresh``: a new run, not a resumed one."""
    t = cfg.train
    device, r, world = _process(cfg)
    source, recipe, channels = _data(cfg, dataset, backbone is not None, r)
    loader = ViewLoader(source, recipe, cfg.data.batch_size, device, r, world, t.seed, cfg.data.workers,
                        cfg.data.device_augment, cfg.data.decode, cfg.data.prefetch)
    net, starting = _backbone(cfg, channels, recipe, backbone, fresh, r)
    model = build_method(cfg, channels, recipe.size, net).to(device)
    hooks = hooks_of(model)                         # every call into the method goes through these
    if hooks.set_views is not None:                 # e.g. distill: the teacher's input and its cache
        hooks.set_views(recipe)
    if hooks.make_masker is not None:               # masked image modeling: masks drawn with each batch
        loader.masker = hooks.make_masker()
        loader.masker.grid((recipe.size, recipe.size))     # a view size off the patch grid: refused before step 1
    channels_last = cfg.backbone.channels_last and backbone is None and is_convnet(net)
    if channels_last:           # oneDNN (CPU) and cuDNN both run NHWC convolutions faster
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = pick_precision(t.precision, device)
    if world > 1 and cfg.backbone.sync_bn:          # global BN before the optimizer sees the parameters
        model = convert_sync_batchnorm(model, device.type)
        hooks = hooks_of(model)
    fsdp = t.fsdp and world > 1
    if t.fsdp and world == 1:
        log.info("train.fsdp: one process, nothing to shard")
    if fsdp and amp_dtype == torch.float16:     # the gradient scaler is not checked on sharded (DTensor) grads
        if t.precision == "fp16":
            raise ValueError("train.precision=fp16 with train.fsdp is not supported: use bf16 (Ampere or newer), "
                             "fp32, or DDP (train.fsdp=false)")
        log.warning("train.precision=auto: this GPU has no native bf16 and fp16 is not supported with FSDP: fp32")
        amp_dtype = None
    if fsdp:                    # before the optimizer: it must see the sharded parameters
        shard_model(model, device, amp_dtype)
    scaled = backbone_lr_scales(net, cfg.backbone.lr_scale, cfg.optim.layer_decay, cfg.optim.patch_embed_lr_scale)
    optimizer = build_optimizer(model, cfg.optim, device.type, sharded=fsdp, fixed_lr=hooks.fixed_lr(),
                                lr_scales=scaled)
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
                 optimizer, compiled, probe, ddp, starting, grad_scaler(amp_dtype, device))
