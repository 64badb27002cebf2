"""ops/launch.py: kernels launch normally; inside compile_only() they only compile, side by side.

The fake kernels below do what Triton's JITFunction does: ``kernel[grid](...)`` runs, and
``warmup`` compiles, handing the compile to the active AsyncCompileMode when there is one.
Triton is imported only when a test runs: the interpreter tests set TRITON_INTERPRET before
Triton's first import, at collection.
"""

from __future__ import annotations

import threading

import pytest
import torch

from distllm.ops import launch as L



def active_mode():
    from triton.runtime._async_compile import active_mode as mode

    return mode.get()


class FakeCompiled:
    def __init__(self, name: str):
        self.name = name
        self.module = None  # not launched yet: no binary handle
        self.compiled_in = threading.current_thread().name


class FakeKernel:
    """Compiles once per (args, kwargs) key; ``compile_barrier`` makes compiles wait for each other."""

    def __init__(self, name: str, compile_barrier: threading.Barrier | None = None):
        self.name = name
        self.cache: dict = {}
        self.runs: list = []
        self.barrier = compile_barrier

    def __getitem__(self, grid):
        return lambda *a, **k: self.runs.append((grid, a, k))

    def _compile(self, key):
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # only passes if the compiles run side by side
        return FakeCompiled(f"{self.name}{key}")

    def warmup(self, *args, grid, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key in self.cache:
            return self.cache[key]
        mode = active_mode()
        if mode is None:
            k = self.cache[key] = self._compile(key)
            return k
        fut = mode.submit((self.name, key), lambda: self._compile(key),
                          lambda k: self.cache.__setitem__(key, k), lambda f: None)
        self.cache[key] = fut
        return fut


def test_launch_runs_the_kernel_outside_compile_only():
    k = FakeKernel("a")
    L.launch(k, (3, 1), 1, 2, BLOCK=4)
    assert k.runs == [((3, 1), (1, 2), {"BLOCK": 4})]
    assert not L.compiling_only()


def test_compile_only_compiles_in_parallel_and_runs_nothing(monkeypatch):
    built = []
    monkeypatch.setattr(L, "_build_launcher", lambda k: built.append(k.name))
    monkeypatch.setattr(L, "MAX_THREADS", 4)
    monkeypatch.setattr(L.os, "cpu_count", lambda: 4)
    barrier = threading.Barrier(3)  # three distinct compiles, all in flight at once
    k1, k2 = FakeKernel("k1", barrier), FakeKernel("k2", barrier)
    with L.compile_only("test") as pas:
        assert L.compiling_only()
        L.launch(k1, (1,), 1, BLOCK=8)
        L.launch(k1, (2,), 1, BLOCK=8)  # same variant: one compile
        L.launch(k1, (1,), 2, BLOCK=8)
        L.launch(k2, (1,), 1)
    assert not L.compiling_only()
    assert k1.runs == [] and k2.runs == []  # nothing ran
    assert pas.compiled == 3 and len(pas.kernels) == 4
    assert sorted(built) == sorted(c.name for k in (k1, k2) for c in k.cache.values())  # each launcher once
    for k in (k1, k2):  # finalized: the real launch finds the compiled kernel
        for c in k.cache.values():
            assert isinstance(c, FakeCompiled) and c.compiled_in.startswith("triton-compile")
    assert active_mode() is None


def test_compile_only_skips_launchers_of_kernels_already_loaded(monkeypatch):
    built = []
    monkeypatch.setattr(L, "_build_launcher", lambda k: built.append(k.name))
    k = FakeKernel("k")
    loaded = k.warmup(1, grid=(1,))  # compiled before, outside the pass ...
    loaded.module = object()  # ... and launched since
    with L.compile_only("test") as pas:
        L.launch(k, (1,), 1)
    assert pas.compiled == 0 and built == []


def test_compile_only_raises_a_compile_error_on_exit(monkeypatch):
    monkeypatch.setattr(L, "_build_launcher", lambda k: None)

    class Broken(FakeKernel):
        def _compile(self, key):
            raise RuntimeError("no such intrinsic")

    with pytest.raises(RuntimeError, match="no such intrinsic"):
        with L.compile_only("test"):
            L.launch(Broken("b"), (1,), 1)
    assert not L.compiling_only() and active_mode() is None


def test_precompile_is_off_where_it_cannot_work(monkeypatch):
    ran = []
    assert L.precompile("cpu", torch.device("cpu"), lambda: ran.append(1)) is None
    assert ran == []  # not run at all: its kernels compile when the real pass launches them
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not L.available(torch.device("cuda", 0))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(L, "ENABLED", False)
    assert not L.available(torch.device("cuda", 0))
    monkeypatch.setattr(L, "ENABLED", True)
    assert L.available(torch.device("cuda", 0))  # decided without touching the device


def test_every_triton_launch_in_ops_goes_through_launch():
    """A kernel launched as kernel[grid](...) would run (on garbage) inside a compile-only pass."""
    import pathlib
    import re

    ops = pathlib.Path(L.__file__).parent
    direct = [f"{p.name}: {m.group(0)}" for p in ops.glob("*.py") if p.name != "launch.py"
              for m in re.finditer(r"\b\w*kernel\[[^\]]*\]\(", p.read_text())]
    assert direct == []
