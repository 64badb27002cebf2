"""Tensor-parallel group state: rank, size and the collectives the layers call.

With tp size 1 every collective is a no-op, so the model files never branch on parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    group: object | None = None
    # distllm.distributed.custom_all_reduce.CustomAllReduce when enabled (CUDA, NVLink peers).
    custom_ar: object | None = None


_TP = _TPState()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def get_tp_group():
    return _TP.group


def set_custom_all_reduce(car) -> None:
    """Install (or with None remove) the custom all-reduce tp_all_reduce tries first."""
    if _TP.custom_ar is not None and _TP.custom_ar is not car:
        _TP.custom_ar.close()
    _TP.custom_ar = car


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> None:
    """Join the TP group (gloo on CPU, nccl on GPU). One group: the whole world is one TP group."""
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
        _TP.group = dist.group.WORLD
    _TP.rank, _TP.size = rank, world_size


def destroy_tensor_parallel() -> None:
    set_custom_all_reduce(None)  # its peer mappings go before the process group does
    if _TP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _TP.rank, _TP.size, _TP.group = 0, 1, None


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    car = _TP.custom_ar
    if car is not None and car.should_use(x):
        return car.all_reduce(x)  # in place, like dist.all_reduce
    dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual) for x, a row-parallel
    layer's partial output (or the vocab-parallel embedding's, with residual None: nothing
    added): one fused kernel when the custom all-reduce takes x, otherwise the all-reduce and
    then the (fused add +) RMSNorm."""
    car = _TP.custom_ar if _TP.size > 1 else None
    if car is not None and car.should_use_fused_norm(x, residual, weight):
        return car.all_reduce_add_rms_norm(x, residual, weight, eps)
    from distllm.ops import dispatch

    if residual is None:
        x = tp_all_reduce(x)
        return dispatch.rms_norm(x, weight, eps), x
    return dispatch.fused_add_rms_norm(tp_all_reduce(x), residual, weight, eps)


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along dim (same shape on every rank)."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)

