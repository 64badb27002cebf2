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

from distllm.config import _DTYPES, EngineArgs
from distllm.worker.memory_plan import GiB, DecoderShape, fmt_bytes, format_plan, plan_memory, with_offload


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


def _gguf_lines(path: str, dtype: str, weight_bytes_all_ranks: int) -> list[str]:
    from distllm.models.gguf_loader import gguf_tensor_info

    infos = [t for t in gguf_tensor_info(path) if t.hf_name is not None]
    total = sum(t.n_bytes for t in infos)
    kinds = Counter(t.quant_type for t in infos)
    by_kind = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return [
        f"GGUF: the file holds {fmt_bytes(total)} of weights ({by_kind}); this plan counts them dequantized "
        f"to {dtype} at load ({fmt_bytes(weight_bytes_all_ranks)} over all GPUs); kept quantized they would "
        f"take about {fmt_bytes(total)} ({weight_bytes_all_ranks / max(total, 1):.1f}x less)."
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    model = args.model_pos if args.model_pos is not None else args.model
    common = dict(
        model=model, dtype=args.dtype, device="cuda",  # dtype "auto" resolves as it would on a GPU
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, cpu_offload_gb=args.cpu_offload_gb,
        enforce_eager=args.enforce_eager, revision=args.revision, load_format=args.load_format,
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
    offload = with_offload(plan, args.cpu_offload_gb) if args.cpu_offload_gb > 0 else None
    if offload is not None and int(args.cpu_offload_gb * GiB) > plan.offloadable_bytes:
        offload.notes.append(
            f"cpu_offload_gb={args.cpu_offload_gb:g} is more than the decoder layers' weights "
            f"({fmt_bytes(plan.offloadable_bytes)}): offload is capped there (embedding and LM head stay on the GPU).")
    if offload is not None and plan.fits and plan.weights_on_gpu_bytes < plan.usable_bytes:
        offload.notes.append("the weights fit without offload; offload only buys KV cache at the price of "
                             "host-to-device copies every step.")
    extra = _gguf_lines(mc.gguf_file, mc.dtype, plan.weight_bytes * plan.tp) if mc.gguf_file else []
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
    p.add_argument("--cpu-offload-gb", type=float, default=0.0, help="GiB of layer weights per GPU held in host memory")
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
