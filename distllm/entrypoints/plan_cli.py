"""`distllm plan [MODEL]`: the per-GPU memory plan (weights, activations, CUDA graphs, KV cache,
the largest max_model_len, what CPU offload would change) from the model's config alone.

Nothing is loaded but config.json (or the GGUF header); with --gpu-memory-gb it runs on a
machine without a GPU. Formulas: distllm/worker/memory_plan.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import replace

from distllm.config import _DTYPES, EngineArgs, _offload_arg
from distllm.worker.memory_plan import (
    GiB,
    DecoderShape,
    fmt_bytes,
    format_plan,
    offload_needed_gb,
    plan_memory,
    with_offload,
)


def detect_gpu_memory_bytes() -> int | None:
    """Total memory of GPU 0 (NVML, else torch), None when there is no GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(visible.split(",")[0]) if visible and visible.split(",")[0].strip().isdigit() else 0
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception:  # noqa: BLE001 - no NVML / no driver: ask torch
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001
        pass
    return None


def _gguf_weight_bytes(path: str, dtype: str, tp: int) -> tuple[int, int, int]:
    """(per-GPU bytes with 2-D weights of supported types kept quantized, the file's bytes, the
    same tensors dequantized to ``dtype``, over all GPUs). As the loader does: every 2-D weight
    of a supported type stays quantized (the token embedding too), norms are floats; a quantized
    weight splits by rows or whole blocks across ranks, so a rank holds 1/tp of its bytes."""
    from distllm.models.gguf_loader import gguf_tensor_info
    from distllm.ops.gguf_quant import is_supported_qtype
    from distllm.worker.memory_plan import dtype_bytes

    e = dtype_bytes(dtype)
    infos = [t for t in gguf_tensor_info(path) if t.hf_name is not None]
    kept = 0
    for t in infos:
        quantized = len(t.shape) == 2 and is_supported_qtype(t.quant_type)
        kept += t.n_bytes if quantized else _numel(t.shape) * e
    dequantized = sum(e * _numel(t.shape) for t in infos)
    return -(-kept // tp), sum(t.n_bytes for t in infos), dequantized


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gguf_lines(path: str, dtype: str, quantized: bool, per_gpu_bytes: int, tp: int) -> list[str]:
    from distllm.models.gguf_loader import gguf_tensor_info

    infos = [t for t in gguf_tensor_info(path) if t.hf_name is not None]
    kinds = Counter(t.quant_type for t in infos)
    by_kind = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    _, file_bytes, dequantized = _gguf_weight_bytes(path, dtype, tp)
    if quantized:
        return [
            f"GGUF: the file holds {fmt_bytes(file_bytes)} of weights ({by_kind}); kept quantized on the GPU "
            f"(quantization='gguf', the CUDA default) they take {fmt_bytes(per_gpu_bytes)} per GPU (norms "
            f"as {dtype}); dequantized at load (quantization='dequantize') they would take "
            f"{fmt_bytes(dequantized)} over all GPUs."
        ]
    return [
        f"GGUF: the file holds {fmt_bytes(file_bytes)} of weights ({by_kind}); this plan counts them dequantized "
        f"to {dtype} at load ({fmt_bytes(dequantized)} over all GPUs)."
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    model = args.model_pos if args.model_pos is not None else args.model
    common = dict(
        model=model, dtype=args.dtype, device="cuda",  # dtype "auto" resolves as it would on a GPU
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, cpu_offload_gb=0.0,
        enforce_eager=args.enforce_eager, revision=args.revision, load_format=args.load_format,
        quantization=args.quantization,
    )
    # First without max_model_len: the model's own limit.
    model_limit = EngineArgs(**common).create_engine_config().model_config.max_model_len
    cfg = EngineArgs(**common, max_model_len=args.max_model_len).create_engine_config()
    mc, sc = cfg.model_config, cfg.scheduler_config

    if args.gpu_memory_gb is not None:
        if args.gpu_memory_gb <= 0:
            raise ValueError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}.")
        gpu_bytes = int(args.gpu_memory_gb * GiB)
        where = f"--gpu-memory-gb {args.gpu_memory_gb:g}"
    else:
        detected = detect_gpu_memory_bytes()
        if detected is None:
            raise ValueError(
                "no GPU found to read the memory size from: pass --gpu-memory-gb M (GiB per GPU), "
                "e.g. --gpu-memory-gb 79.6 for an H100 80GB."
            )
        gpu_bytes, where = detected, "GPU 0 (detected)"

    shape = DecoderShape.from_hf(mc.hf_config, mc.architecture)
    plan = plan_memory(
        shape, mc.dtype, tp=cfg.parallel_config.tensor_parallel_size, gpu_memory_bytes=gpu_bytes,
        gpu_memory_utilization=cfg.cache_config.gpu_memory_utilization, max_model_len=sc.max_model_len,
        model_max_len=model_limit, max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
        block_size=cfg.cache_config.block_size, cpu_offload_gb=0.0, enforce_eager=cfg.enforce_eager,
        cuda_context_bytes=int(args.cuda_context_gb * GiB),
    )
    auto_note = None
    if args.cpu_offload_gb == "auto":
        # As the engine's "auto": the least offload that leaves KV room for one max_model_len sequence.
        need = offload_needed_gb(plan)
        if need is None:
            auto_note = "cpu_offload_gb=auto: even offloading every layer leaves no room for one max_model_len sequence."
            args.cpu_offload_gb = 0.0
        else:
            auto_note = f"cpu_offload_gb=auto: {need:g} GiB (the least that fits one max_model_len sequence)."
            args.cpu_offload_gb = need
    offload = with_offload(plan, args.cpu_offload_gb) if args.cpu_offload_gb > 0 else None
    if offload is not None and auto_note:
        offload.notes.append(auto_note)
    if offload is not None and int(args.cpu_offload_gb * GiB) > plan.offloadable_bytes:
        offload.notes.append(
            f"cpu_offload_gb={args.cpu_offload_gb:g} is more than the decoder layers' weights "
            f"({fmt_bytes(plan.offloadable_bytes)}): offload is capped there (embedding and LM head stay on the GPU).")
    if offload is not None and plan.fits and plan.weights_on_gpu_bytes < plan.usable_bytes:
        offload.notes.append("the weights fit without offload; offload only buys KV cache at the price of "
                             "host-to-device copies every step.")
    extra: list[str] = []
    if mc.gguf_file:
        quantized = mc.quantization == "gguf"
        if quantized:
            if args.cpu_offload_gb > 0:
                raise NotImplementedError(
                    "cpu_offload_gb with GGUF weights kept quantized is not supported yet; add "
                    "--quantization dequantize to plan an offloaded GGUF model.")
            per_gpu, _, _ = _gguf_weight_bytes(mc.gguf_file, mc.dtype, plan.tp)
            plan = replace(plan, weight_bytes=per_gpu)
        extra = _gguf_lines(mc.gguf_file, mc.dtype, quantized, plan.weight_bytes, plan.tp)
    if auto_note and offload is None:
        extra.append(auto_note)
    title = f"distllm plan: {mc.model} ({mc.architecture}); GPU memory from {where}"
    print(format_plan(plan, title=title, offload=offload, extra_lines=extra), flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan (weights, activations, KV cache) without loading weights")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="HF folder, GGUF file or hub id (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--model", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--cpu-offload-gb", type=_offload_arg, default=0.0,
                   help="GiB of layer weights per GPU held in host memory, or 'auto'")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GiB per GPU (default: read from GPU 0; required without a GPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dtype", type=str, default="auto", choices=list(_DTYPES),
                   help="auto: as on a GPU (bfloat16 unless the config says float16)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (no graph pool)")
    p.add_argument("--cuda-context-gb", type=float, default=0.5,
                   help="CUDA context, cuBLAS and Triton overhead per GPU (estimate, GiB)")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--load-format", type=str, default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--quantization", type=str, default=None, choices=["gguf", "dequantize"],
                   help="GGUF files: kept quantized ('gguf', the default on GPUs) or dequantized at load")
    p.set_defaults(func=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distllm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(argv or [])])
    try:
        return cmd_plan(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"distllm: error: {e}", file=sys.stderr)
        return 2


__all__ = ["cmd_plan", "register", "detect_gpu_memory_bytes", "main"]
