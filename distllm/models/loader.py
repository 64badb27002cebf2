"""Build a model and fill its weights: safetensors folder, GGUF file, or dummy random weights.

Safetensors tensors are handed to the weight loaders as lazy slices, so each tensor-parallel
rank reads only the bytes of its own shard.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from distllm.config import ModelConfig
from distllm.layers.quantized import deferred_linear_weights
from distllm.logger import init_logger
from distllm.models.registry import get_model_class

logger = init_logger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"model.safetensors.index.json in {folder!r} names shards that are missing: "
                + ", ".join(os.path.basename(m) for m in missing)
            )
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        has_bin = glob.glob(os.path.join(folder, "*.bin")) or glob.glob(os.path.join(folder, "*.pt"))
        hint = " (found PyTorch .bin/.pt files: distllm never unpickles weights; convert them to safetensors)" if has_bin else ""
        raise FileNotFoundError(f"no *.safetensors weights in model folder {folder!r}{hint}.")
    return files


def iter_safetensors(folder: str) -> Iterator[tuple[str, Any]]:
    from safetensors import SafetensorError, safe_open

    for path in safetensors_files(folder):
        try:
            f = safe_open(path, framework="pt")
            names = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read safetensors file {path!r}: it is corrupt or truncated ({e}).") from None
        for name in names:
            try:
                yield name, f.get_slice(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"cannot read tensor {name!r} from {path!r}: corrupt file ({e}).") from None


@torch.no_grad()
def _fill_dummy(model: nn.Module, seed: int, device: torch.device | str) -> None:
    # Small uniform values keep activations finite through many layers (what vLLM does too).
    torch.manual_seed(seed)
    device = torch.device(device)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif p.device.type != device.type:
            # Offloaded to host memory: draw on `device` all the same, so the values (and the
            # generator's state for the next parameter) equal a run without offload.
            p.copy_(torch.empty_like(p, device=device).uniform_(-1e-3, 1e-3))
        else:
            p.uniform_(-1e-3, 1e-3)


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device (buffers stay where they are made), so
    a `place` step can decide where each weight lives before any device memory holds it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@torch.no_grad()
def load_model(
    model_config: ModelConfig,
    device: torch.device | str,
    seed: int = 0,
    place: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """`place`, when given, is called on the freshly built model whose parameters are still on
    the meta device; it must give each one real memory (worker/offload.py puts some layers in
    pinned host memory). The weights are loaded after it, wherever it put them."""
    t0 = time.perf_counter()
    dtype = torch_dtype(model_config.dtype)
    cls = get_model_class(model_config.architecture)
    quantized = model_config.load_format == "gguf" and model_config.quantization == "gguf"
    if quantized and place is not None:
        raise NotImplementedError(
            "cpu_offload_gb with GGUF weights kept quantized is not supported yet; pass "
            "quantization='dequantize' to offload a GGUF model, or drop cpu_offload_gb."
        )
    with torch.device(device), (deferred_linear_weights(device) if quantized else contextlib.nullcontext()):
        if place is None:
            model = cls(model_config.hf_config, dtype)
        else:
            with _params_on_meta():
                model = cls(model_config.hf_config, dtype)
    if place is not None:
        place(model)
    fmt = model_config.load_format
    if fmt == "dummy":
        _fill_dummy(model, seed, device)
    elif fmt == "gguf":
        from distllm.models.gguf_loader import iter_gguf_tensors

        path = model_config.gguf_file or model_config.model
        model.load_weights(iter_gguf_tensors(path, dtype, keep_quantized=quantized))
        if quantized:
            from distllm.layers.quantized import quantization_summary

            summary = quantization_summary(model, dtype)
            logger.info("%s", summary.describe(model_config.dtype))
            logger.debug("GGUF-quantized layers: %s", ", ".join(summary.layers))
    elif fmt == "safetensors":
        model.load_weights(iter_safetensors(model_config.model))
    else:
        raise ValueError(f"unknown load_format {fmt!r}")
    model.eval()
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    logger.info(
        "Loaded %s (%s%s, %.2f GB of weights, %s) in %.2f s",
        model_config.architecture, fmt, ", kept quantized" if model_config.quantization == "gguf" else "",
        gb, model_config.dtype, time.perf_counter() - t0,
    )
    return model
