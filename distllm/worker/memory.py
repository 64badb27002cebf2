"""GPU memory profiling: how many KV blocks fit after the weights and the peak activations."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from distllm.logger import init_logger
from distllm.ops.launch import precompile
from distllm.worker.kv_cache import KVCacheSpec

if TYPE_CHECKING:
    from distllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)


def device_total_memory(device: torch.device) -> int:
    """Total device memory, read through NVML where it is installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
    except Exception:  # noqa: BLE001 - NVML missing or restricted: torch knows the total too
        return torch.cuda.mem_get_info(device)[1]


@torch.inference_mode()
def profile_num_gpu_blocks(runner: "ModelRunner", spec: KVCacheSpec) -> int:
    """Run the largest batch the scheduler may send (without a KV cache), take this process's
    peak memory, and give the KV cache what is left of gpu_memory_utilization * total."""
    from distllm.layers.attention import AttentionMetadata, forward_context

    t0 = time.perf_counter()
    cfg = runner.config
    device = runner.device
    n_tokens = min(cfg.scheduler_config.max_num_batched_tokens, cfg.scheduler_config.max_num_seqs * cfg.scheduler_config.max_model_len)
    n_seqs = max(1, min(cfg.scheduler_config.max_num_seqs, n_tokens))
    per = n_tokens // n_seqs
    lens = [per] * n_seqs
    lens[-1] += n_tokens - per * n_seqs
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((n_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros((n_seqs, 1), dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=qsl,
        max_query_len=max(lens),
        max_seq_len=max(lens),
        fresh_prefill_only=True,
    )
    ids = torch.zeros(n_tokens, dtype=torch.int64, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])

    def forward() -> None:
        with forward_context(meta, None):
            hidden = runner.model(ids, pos)
            if hasattr(runner.model, "compute_logits"):
                # The sampler sees at most one row per sequence.
                runner.model.compute_logits(hidden[: cfg.scheduler_config.max_num_seqs]).float().softmax(-1)

    # Its kernels first, compiled side by side (ops/launch.py), so the timed forward only runs.
    precompile("memory profile", device, forward)
    torch.cuda.synchronize(device)
    t_setup = time.perf_counter()
    torch.cuda.reset_peak_memory_stats(device)
    forward()
    torch.cuda.synchronize(device)
    t_forward = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    total = device_total_memory(device)
    t_end = time.perf_counter()
    free_now, _ = torch.cuda.mem_get_info(device)
    used_by_others = total - free_now - torch.cuda.memory_reserved(device)
    budget = int(total * cfg.cache_config.gpu_memory_utilization) - peak - max(0, used_by_others)
    num_blocks = max(0, budget // spec.block_bytes)
    logger.info(
        "Memory profile: total %.1f GiB, weights+peak activations %.2f GiB, KV budget %.2f GiB -> %d blocks "
        "(%.2f s: setup and kernel compiles %.2f, forward of %d tokens %.2f, totals %.2f)",
        total / 2**30, peak / 2**30, budget / 2**30, num_blocks, t_end - t0, t_setup - t0, n_tokens,
        t_forward - t_setup, t_end - t_forward,
    )
    need = -(-cfg.scheduler_config.max_model_len // spec.block_size)
    if num_blocks < need:
        fits = num_blocks * spec.block_size
        raise ValueError(
            f"max_model_len ({cfg.scheduler_config.max_model_len}) tokens do not fit in the KV cache: only {fits} tokens "
            f"fit with gpu_memory_utilization={cfg.cache_config.gpu_memory_utilization}. Lower max_model_len to {fits} "
            "or less, raise gpu_memory_utilization, or use more GPUs (tensor_parallel_size)."
        )
    return num_blocks
