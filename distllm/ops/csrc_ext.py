"""Just-in-time build of the C++/CUDA ops in ``csrc/`` (the ``distllm_C`` torch library).

``torch.utils.cpp_extension`` compiles ``csrc/sampling.cpp`` (op schema and CPU kernel) and,
where torch has CUDA and nvcc is found, ``csrc/sampling_cuda.cu``, into a build directory per
torch build, where ninja recompiles only what changed: a machine compiles once. Every op has a torch fallback
(``distllm/ops/sampling_ref.py``), so nothing depends on the build succeeding.

``DISTLLM_CSRC`` picks when the ops are used:
- ``auto`` (default): on CUDA tensors only. A CUDA worker loads a build from an earlier run
  at the end of its start-up (``finish_build``); the first start on a machine compiles in a
  background process instead (``start_build``), beside the weight load and graph capture,
  and does not wait for it (``DISTLLM_CSRC_WAIT_S`` sets a wait): that run samples with the
  torch ops, later ones load the build. Tensor-parallel ranks agree to use the ops only when
  every rank has them, so their samples stay identical.
- ``1``: on CPU and CUDA tensors; the first call that needs the ops builds them and waits (a
  CUDA worker waits for its background build at the end of start-up).
- ``0``: never.
``DISTLLM_CSRC_BUILD_DIR`` overrides the build directory (default:
``~/.cache/distllm/csrc/torch<version>-<cuda|cpu>``).
The sources are found beside the ``distllm`` package (a source checkout or an editable
install, as the README installs it); without them the ops are simply not used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from distllm.logger import init_logger

logger = init_logger(__name__)

LIBRARY = "distllm_C"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"

_lock = threading.Lock()
_ops: Any = None  # torch.ops.distllm_C once loaded
_failed = False  # a build or load failed: never retried in this process
_started = False  # start_build ran (a build is running, done, or was not needed)
_builder: threading.Thread | None = None  # the background build's thread, if one was needed
_built = threading.Event()  # the background build finished (successfully or not)
_build_error: str | None = None


def mode() -> str:
    m = os.environ.get("DISTLLM_CSRC", "auto").strip().lower()
    if m in ("0", "false", "no", "off"):
        return "0"
    if m in ("1", "true", "yes", "on"):
        return "1"
    return "auto"


def with_cuda() -> bool:
    """Build the CUDA kernels too? (torch built with CUDA and nvcc found)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def sources(cuda: bool | None = None) -> list[str]:
    cuda = with_cuda() if cuda is None else cuda
    names = ["sampling.cpp"] + (["sampling_cuda.cu"] if cuda else [])
    return [str(CSRC_DIR / n) for n in names]


def _build_kwargs() -> dict[str, Any]:
    cuda = with_cuda()
    kw: dict[str, Any] = dict(
        name=LIBRARY + ("_cuda" if cuda else "_cpu"),
        sources=sources(cuda),
        extra_include_paths=[str(CSRC_DIR)],
        extra_cflags=["-O3"],
        is_python_module=False,
        verbose=False,
    )
    if cuda:
        kw["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr", "--extended-lambda"]
    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    kw["build_directory"] = str(build_dir)
    return kw


def _pin_cuda_arch() -> None:
    """Name the visible GPU's architecture in TORCH_CUDA_ARCH_LIST, so that the background
    compiler needs no GPU (it would otherwise open a CUDA context on it to ask) and this
    process's later load sees the same flags and finds the build up to date."""
    if with_cuda() and "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def _build_dir() -> Path:
    env = os.environ.get("DISTLLM_CSRC_BUILD_DIR")
    if env:
        return Path(env)
    flavour = f"cu{torch.version.cuda}" if with_cuda() else "cpu"
    return Path.home() / ".cache" / "distllm" / "csrc" / f"torch{torch.__version__.split('+')[0]}-{flavour}"


def _library_is_fresh() -> bool:
    """A library built from the current sources is in the build directory (then loading it
    needs no compiler run worth a background process)."""
    d = _build_dir()
    libs = list(d.glob(LIBRARY + "*.so")) if d.is_dir() else []
    if not libs:
        return False
    newest_source = max(p.stat().st_mtime for p in CSRC_DIR.iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    return max(p.stat().st_mtime for p in libs) >= newest_source


def _compile_and_load() -> Any:
    """Compile (or find up to date) and load the library into this process: torch.ops.distllm_C."""
    from torch.utils.cpp_extension import load

    _pin_cuda_arch()
    load(**_build_kwargs())
    return torch.ops.distllm_C


def _available_sources() -> bool:
    return all(Path(s).is_file() for s in sources())


def _background_build() -> None:
    """Compile in a child process (no GIL, no CUDA context here); the caller's thread loads."""
    global _build_error
    t0 = time.perf_counter()
    # The child outlives this process if it exits first, so that the next start finds the build.
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from distllm.ops import csrc_ext; "
        "csrc_ext.CSRC_DIR = Path(sys.argv[2]); "
        "from torch.utils.cpp_extension import load; load(**csrc_ext._build_kwargs())"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # Output to a file, not a pipe: a child left compiling after this process exits must not
    # die writing to a reader that is gone.
    build_dir = _build_dir()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        log_path = build_dir / "build.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-c", code, str(Path(__file__).resolve().parents[2]), str(CSRC_DIR)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
        if proc.returncode != 0:
            _build_error = f"(full log: {log_path})\n" + log_path.read_text(errors="replace")[-2000:]
        else:
            logger.info("csrc: %s compiled in %.1f s (background)", LIBRARY, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - any failure means: keep the torch path
        _build_error = repr(e)
    finally:
        _built.set()


def start_build() -> None:
    """Start compiling the ops in the background where they would be used (idempotent)."""
    global _builder, _started
    if mode() == "0" or _ops is not None or _failed or _started:
        return
    if not _available_sources():
        return
    with _lock:
        if not _started:
            _pin_cuda_arch()
            if _library_is_fresh():
                _built.set()  # nothing to build: finish_build loads it
                _started = True
                return
            _builder = threading.Thread(target=_background_build, name="distllm-csrc-build", daemon=True)
            _builder.start()
            _started = True
            logger.info("csrc: building %s in the background (first time on this machine)", LIBRARY)


def load_now() -> Any:
    """Build (waiting for it) and load the ops; None, with a warning, when that fails."""
    global _ops, _failed
    if _ops is not None or _failed:
        return _ops
    with _lock:
        if _ops is not None or _failed:
            return _ops
        if not _available_sources():
            _failed = True
            logger.warning("csrc: sources not found in %s; using the torch ops", CSRC_DIR)
            return None
        t0 = time.perf_counter()
        try:
            _ops = _compile_and_load()
            logger.info("csrc: %s loaded in %.1f s (CUDA kernels: %s)", LIBRARY, time.perf_counter() - t0, with_cuda())
        except Exception as e:  # noqa: BLE001 - a compiler or loader error: keep the torch path
            _failed = True
            logger.warning("csrc: building %s failed, using the torch ops instead: %s", LIBRARY, str(e)[-2000:])
        return _ops


def finish_build(timeout_s: float | None = None) -> Any:
    """End of a worker's start-up: load the ops if their build is done.

    A build from earlier runs is just loaded. A first build on this machine runs in a
    background process from ``start_build`` on, beside the weight load, the memory profile
    and the graph capture; start-up waits for it at most ``DISTLLM_CSRC_WAIT_S`` seconds
    (default 0: a cold start never waits for a compiler; 900 with ``DISTLLM_CSRC=1``). A build still running keeps going,
    for the next start; this run keeps the torch ops. Sampling never switches paths mid-run.
    Returns the ops, or None (with a log line saying why)."""
    global _failed
    if mode() == "0" or _failed:
        return None
    if _ops is not None or not _started:
        return _ops
    if timeout_s is None:
        # DISTLLM_CSRC=1 asked for the ops: wait for them here rather than build mid-run.
        default = "900" if mode() == "1" else "0"
        timeout_s = float(os.environ.get("DISTLLM_CSRC_WAIT_S", default))
    if not _built.is_set():
        t0 = time.perf_counter()
        if not _built.wait(timeout_s):
            logger.info(
                "csrc: the first build of %s on this machine is still running; this run samples with "
                "the torch ops, later starts load it (DISTLLM_CSRC_WAIT_S=120 waits for it)",
                LIBRARY,
            )
            return None
        logger.info("csrc: waited %.1f s for the build", time.perf_counter() - t0)
    if _build_error is not None:
        _failed = True
        logger.warning("csrc: building %s failed, sampling keeps the torch ops:\n%s", LIBRARY, _build_error)
        return None
    return load_now()


def disable(reason: str) -> None:
    """Stop using the ops in this process (e.g. another tensor-parallel rank has none)."""
    global _ops, _failed
    if _ops is not None or not _failed:
        logger.warning("csrc: %s off: %s", LIBRARY, reason)
    _ops, _failed = None, True


def ops_for(device: torch.device) -> Any:
    """torch.ops.distllm_C where it serves tensors on ``device``, else None.

    ``auto`` uses what a worker's start-up loaded (``finish_build``) and never builds here;
    ``1`` builds on the first call and waits."""
    m = mode()
    if m == "0" or _failed:
        return None
    if device.type == "cuda" and not with_cuda():
        return None
    if device.type != "cuda" and m != "1":
        return None
    if _ops is not None:
        return _ops
    return load_now() if m == "1" else None
