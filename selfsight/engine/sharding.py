"""Fully sharded data parallelism (FSDP2: ``torch.distributed.fsdp.fully_shard``) for large models.

Under DDP every process holds all parameters, gradients and optimizer moments; a ViT-L with AdamW
needs ~16 bytes per parameter per process before activations. ``train.fsdp=true`` shards the
three over the processes instead (Zhao et al. 2023, "PyTorch FSDP"; ZeRO-3 of Rajbhandari et al.
2020): each transformer block (and each ResNet stage) is one unit whose parameters are gathered
just before its forward and backward and freed after, and the gradients are reduce-scattered, so
every process keeps 1/W of the state. The arithmetic equals DDP's (gradients averaged over the
processes); ``tests/engine/test_fsdp.py`` checks a 2-process sharded run against one process
with the global batch.

The EMA teachers (DINO, iBOT, BYOL, MoCo) are sharded like their students: the in-place
``_foreach_lerp_`` of ``nn.momentum.momentum_update`` runs shard by shard. Buffers (MoCo's queue,
DINO's center) stay whole on every process, as under DDP.

Checkpoints hold the full, unsharded state (gathered to rank 0's CPU), so evaluation, export
and a resume on another number of processes read them like any other; the optimizer state is
stored keyed by parameter names (``torch.distributed.checkpoint.state_dict``), marked with
``optimizer_format: "fqn"``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

OPTIMIZER_FORMAT = "fqn"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become one FSDP unit each: every block of a transformer's ``blocks`` list
    (timm ViTs, decoders, tokenizers) and every stage of a torchvision ResNet (``layer1``..``layer4``)."""
    units = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)):
            units.extend(module)
        elif leaf in ("layer1", "layer2", "layer3", "layer4") and isinstance(module, nn.Sequential):
            units.append(module)
    return units


def shard_model(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` in place over every process of the default group: each unit of
    ``shard_units`` on its own, then the rest (embeddings, heads) as the root unit.
    ``amp_dtype`` (bf16): parameters are gathered in that dtype and gradients reduced in fp32
    (``MixedPrecisionPolicy``), halving the traffic; the stored shards stay fp32."""
    if not dist.is_initialized():
        raise ValueError("train.fsdp needs several processes: start the run with torchrun --nproc-per-node N")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else \
        MixedPrecisionPolicy()
    with torch.no_grad():          # one initialisation for all, rank 0's (what DDP does at construction)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    units = shard_units(model)
    if not units:
        raise ValueError(f"train.fsdp: found no transformer blocks or ResNet stages to shard in {type(model).__name__}")
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside: the root unit's parameters gathered, so parts of a sharded model can run outside
    its ``forward`` (the online probe, pictures); the block units gather themselves. A no-op for
    an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def _options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """The model's state dict, unsharded on rank 0's CPU (collective)."""
    return get_model_state_dict(model, options=_options())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, unsharded on rank 0's CPU (collective: every rank calls it)."""
    return (get_model_state_dict(model, options=_options()),
            get_optimizer_state_dict(model, optimizer, options=_options()))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Scatter full state dicts (as ``full_state`` wrote them; every rank holds them) into the shards."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
