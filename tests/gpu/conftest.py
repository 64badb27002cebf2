"""GPU tests: skipped as a whole without CUDA; Triton kernels run compiled, never interpreted."""

import importlib
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(skip)


def _recompile_interpreted_kernels() -> None:
    """tests/cpu modules set TRITON_INTERPRET=1 at import (collection time), which turns every
    @triton.jit decorated afterwards into an interpreter function. Re-decorate ours."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("distllm."):
            continue
        if any(isinstance(v, InterpretedFunction) for v in vars(mod).values()):
            importlib.reload(mod)


@pytest.fixture(autouse=True, scope="module")
def _compiled_triton():
    if not torch.cuda.is_available():
        yield
        return
    prev = os.environ.pop("TRITON_INTERPRET", None)
    _recompile_interpreted_kernels()
    yield
    if prev is not None:
        os.environ["TRITON_INTERPRET"] = prev
