"""Launch a Triton kernel, or, inside ``compile_only()``, only compile it: in parallel threads.

With an empty Triton cache, an 8B engine's start spent ~10 s compiling kernels one after the
other, each at its first launch: the memory profile's forward and the warm-up run of every
CUDA-graph batch size (H200, benchmarks/README.md). Those passes are known before they run, so
start-up first runs each of them once inside ``compile_only()``: every Triton launch there
(all of them go through ``launch``) becomes ``kernel.warmup``, which under Triton's
``AsyncCompileMode`` hands the compile to a thread pool and returns at once. Triton's compiler
releases the GIL (MLIR passes, LLVM, ptxas), so the threads compile side by side; the context
exits once every kernel, and (on Triton versions that build one) every kernel's C launcher, is
built. The real pass that follows then finds them all in memory.

Torch ops in a compile-only pass still run, on whatever the skipped kernels left in their
output buffers: only passes whose results are thrown away, with no host decision taken on a
kernel's output, may run compile-only. The model forwards qualify (their indices come from the
step's inputs); sampling does not (garbage probabilities would trip torch's checks).

``DISTLLM_PARALLEL_COMPILE=0`` turns it off (kernels then compile at their first launch).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from distllm.logger import init_logger

logger = init_logger(__name__)

ENABLED = os.environ.get("DISTLLM_PARALLEL_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
# Compiles are CPU-bound and a host may run one engine worker per GPU: a few threads each.
MAX_THREADS = int(os.environ.get("DISTLLM_COMPILE_THREADS", "8"))


@dataclass
class CompilePass:
    """What one compile-only pass did (``compile_only`` yields it; filled in on exit)."""

    what: str
    kernels: list = field(default_factory=list)  # whatever warmup returned, one per launch
    compiled: int = 0  # distinct kernels this pass had to compile (not already in memory)
    seconds: float = 0.0


_active: ContextVar[CompilePass | None] = ContextVar("distllm_compile_only", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compile inside ``compile_only()``."""
    active = _active.get()
    if active is None:
        kernel[grid](*args, **kwargs)
    else:
        active.kernels.append(kernel.warmup(*args, grid=grid, **kwargs))


def compiling_only() -> bool:
    """Inside a compile-only pass (launches compile, nothing runs)?"""
    return _active.get() is not None


def available(device) -> bool:
    """Can a compile-only pass run for kernels on ``device`` (a torch.device)?"""
    if not ENABLED or getattr(device, "type", None) != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401 - Triton >= 3.4
    except ImportError:
        return False
    return True


def _threads() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _build_launcher(kernel) -> None:
    """Build (into Triton's cache) the C launcher that the kernel's first real launch loads.
    Triton 3.6 compiles one with the C compiler per kernel signature, serially, at that launch;
    newer Tritons have one generic launcher and this costs nothing."""
    from triton.runtime import driver

    try:
        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception as e:  # noqa: BLE001 - only a head start: the first launch builds it again
        logger.debug("Triton: no launcher built ahead for %s: %s", getattr(kernel, "name", kernel), e)


def _finish(pas: CompilePass, pool: ThreadPoolExecutor) -> int:
    """After AsyncCompileMode has waited for every compile: build the launchers of kernels not
    yet launched in this process, in the pool; returns how many."""
    from triton.runtime._async_compile import FutureKernel

    pending: dict[int, Any] = {}
    futures: set[int] = set()
    for k in pas.kernels:
        if k is None:  # a jit cache hook took the launch
            continue
        if isinstance(k, FutureKernel):
            futures.add(id(k))
            k = k.result()
        if getattr(k, "module", True) is None:  # never launched: no launcher or binary handle yet
            pending[id(k)] = k
    pas.compiled = len(futures)
    list(pool.map(_build_launcher, pending.values()))
    return len(pending)


def precompile(what: str, device, run: Callable[[], object]) -> CompilePass | None:
    """Run ``run()`` compile-only (see the module docstring) where ``available(device)``; else
    do nothing and return None (its kernels then compile at their first real launch)."""
    if not available(device):
        return None
    with compile_only(what) as pas:
        run()
    return pas


@contextlib.contextmanager
def compile_only(what: str) -> Iterator[CompilePass]:
    """Inside: Triton launches (through ``launch``) compile in a thread pool instead of running.
    Exits once every compile is done and logs what it did. Needs Triton's AsyncCompileMode
    (``available``)."""
    pas = CompilePass(what)
    from triton.runtime._async_compile import AsyncCompileMode

    t0 = time.perf_counter()
    threads = _threads()
    token = _active.set(pas)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
            with AsyncCompileMode(pool):
                yield pas
            launchers = _finish(pas, pool)
    finally:
        _active.reset(token)
    pas.seconds = time.perf_counter() - t0
    logger.info("Triton: %s: %d kernel variants compiled or loaded, %d launchers, %.2f s on %d threads",
                what, pas.compiled, launchers, pas.seconds, threads)
