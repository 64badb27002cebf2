"""Programmatic dependent launch (PDL) for the decode chain's Triton kernels (Hopper and later).

A decode step is a chain of a few hundred small kernels, each waiting for the one before. By
default a kernel's programs start only once the previous kernel has fully drained, so every
boundary costs a launch gap, and a GEMV cannot start fetching its weight (which no kernel
writes) until its input row exists. With PDL the next kernel may be launched while the current
one runs: its programs do the work that depends on nothing (the GEMV's first weight tile), then
wait in ``gdc_wait`` until the previous kernel has finished and its writes are visible.

Rules every kernel here follows when ``USE_PDL`` is set (``pdl_wait`` below):
* no load of anything a kernel of the forward writes, and no store at all, before the wait
  (weights, the step's inputs set before the forward, and KV-cache entries of earlier steps
  may be loaded: ops/triton_decode_attention loads its first KV tile there);
* every program reaches the wait, even one with nothing to do (a kernel whose programs all
  exit without it would let the next one launch before the previous kernel has finished);
* ``gdc_launch_dependents`` right after the wait, so at most two kernels of the chain are in
  flight (the next one cannot launch before this one's inputs are ready).
Kernels without PDL in between (cuBLAS, torch ops, NCCL) keep the usual full serialization,
so mixing is safe: a PDL kernel after one of them simply starts late. The custom all-reduce
(ops/triton_all_reduce) waits first thing too: it may spin on its peers' flags only once every
kernel before it has finished, and a GEMV launched behind it only prefetches weights.

On by default where it can work: a CUDA device of compute capability 9.0+ and a Triton with
``launch_pdl`` and ``triton.language.extra.cuda.gdc_wait``; ``DISTLLM_PDL=0`` turns it off.
Under TRITON_INTERPRET and on CPU it is always off. Measured on H200s (benchmarks/README.md,
fifth session): SmolLM2-135M batch-1 decode 1381.7 -> 1819.1 tok/s; Llama-3.1-8B shape TP=4
482.0 -> 521.5 tok/s, TP=1 224.9 -> 232.4, TP=2 unchanged.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # an older Triton: PDL stays off, the jit helpers below still compile
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENABLED = os.environ.get("DISTLLM_PDL", "1").strip().lower() not in ("0", "false", "no", "off")


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel launch (see rules above)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _device_supports(index: int) -> bool:
    if not _HAS_GDC or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(index) < (9, 0):
        return False
    try:  # launch_pdl is a compile option of Triton's CUDA backend
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__
    except (ImportError, AttributeError):
        return False


def use_pdl(t: torch.Tensor) -> bool:
    """Launch kernels working on ``t`` with PDL?"""
    return ENABLED and t.is_cuda and _device_supports(t.device.index if t.device.index is not None else 0)


def launch_options(use: bool) -> dict:
    """Kernel launch kwargs: ``USE_PDL`` for the kernel, plus ``launch_pdl`` when on (older
    Tritons without the option never see it)."""
    return {"USE_PDL": True, "launch_pdl": True} if use else {"USE_PDL": False}
