"""Distributed helpers; every one is a no-op in a single process without a process group."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks (all_reduce SUM)
    and returns this rank's slice (methods.md §0.4, pitfall 1). DDP's gradient averaging
    then equals the gradient of the mean loss over the global batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients over ranks too, since every rank's loss
    depends on the summed value (used by GlobalBatchNorm's statistics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if world_size() > 1 else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """B×... on each rank -> (world·B)×..., rank-ordered; gradients flow back to every rank."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """B×... on each rank -> (world·B)×..., rank-ordered, detached (MoCo keys, logging)."""
    if world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, 0)


def broadcast_from_main(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (in place); a no-op in one process."""
    if world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def _reduce_flag(flag: bool | torch.Tensor, op) -> bool:
    """A boolean combined over ranks with MIN (all) or MAX (any); NCCL needs a CUDA tensor."""
    if world_size() == 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    f = torch.as_tensor(flag, dtype=torch.float32).reshape(1).to(device)
    dist.all_reduce(f, op=op)
    return bool(f.item() > 0)


def any_rank_true(flag: bool | torch.Tensor) -> bool:
    """True when ``flag`` is true on at least one rank (e.g. a stop condition)."""
    return _reduce_flag(flag, dist.ReduceOp.MAX)


def all_ranks(flag: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, true when ``flag`` (a 0-d bool tensor on this process's device) is true
    on every rank: ranks must agree before one of them skips a step, or DDP's gradient all-reduce
    would wait forever. An all_reduce on the device, no host read."""
    if world_size() == 1:
        return flag
    f = flag.to(torch.float32).reshape(1)
    dist.all_reduce(f, op=dist.ReduceOp.MIN)
    return f[0] > 0
