"""Rooflines for issue 5's benchmark table: the machine's ceilings, measured, and what a workload
costs in bytes and FLOPs.

The ceilings are measured on the machine that runs the benchmark (not taken from a data sheet),
so the fractions compare like with like:

- copy bandwidth: a large device-to-device copy, bytes read + written over the time;
- matmul rate: a bf16 8192^3 matmul (fp32 and smaller on CPU), 2 * n^3 FLOPs over the time.

The cost model (a lower bound, as a roofline is):

- a decode step reads every weight once (the LM head included, the embedding only a row per token,
  left out) plus, for each sequence, the K and V of its whole context, in every layer;
- a prefill is compute-bound: 2 FLOPs per matmul parameter per token, the LM head once per sequence
  (only the last position is sampled), plus causal attention;
- roofline time = prefill FLOPs / matmul rate + decode bytes / bandwidth (issue 5's definition).

`cfg` is a HF config dict (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size, optional head_dim and tie_word_embeddings), as in
benchmarks/bench_tp_decode.py's SHAPES.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

# ---- model arithmetic --------------------------------------------------------------------------


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def layer_matmul_params(cfg: dict) -> int:
    """Weights of one decoder layer's matmuls: Q, K, V, O projections and the gated MLP."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * head_dim(cfg)
    kv = cfg["num_key_value_heads"] * head_dim(cfg)
    return h * (q + 2 * kv) + q * h + 3 * h * i


def lm_head_params(cfg: dict) -> int:
    return cfg["vocab_size"] * cfg["hidden_size"]


def weight_bytes_per_step(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of weights one forward step reads: every layer's matmuls and the LM head.

    Norm weights are a few KB and the embedding lookup reads one row per token: both left out.
    With tied embeddings the LM head is the embedding matrix, read once all the same.
    """
    return dtype_bytes * (cfg["num_hidden_layers"] * layer_matmul_params(cfg) + lm_head_params(cfg))


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """K and V of one token in every layer: layers * 2 * num_kv_heads * head_dim * dtype_bytes."""
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim(cfg) * dtype_bytes


def decode_step_bytes(cfg: dict, batch: int, context_lens: int | Sequence[int], dtype_bytes: int = 2) -> int:
    """Bytes one decode step of `batch` sequences reads: the weights once, plus each sequence's KV.

    `context_lens` is one length for every sequence, or one per sequence (the keys the new token
    attends to, itself included).
    """
    lens = [context_lens] * batch if isinstance(context_lens, int) else list(context_lens)
    if len(lens) != batch:
        raise ValueError(f"{len(lens)} context lengths for a batch of {batch}")
    return weight_bytes_per_step(cfg, dtype_bytes) + sum(lens) * kv_bytes_per_token(cfg, dtype_bytes)


def causal_attention_flops(cfg: dict, total_len: int, cached_len: int = 0) -> int:
    """Attention FLOPs of a causal prefill of positions cached_len..total_len-1, all layers.

    A query at position p attends to p + 1 keys; QK^T and PV each cost 2 * n_heads * head_dim
    FLOPs per (query, key) pair, so per layer 4 * n_heads * head_dim * sum_p (p + 1), and
    sum_{p=c}^{T-1} (p + 1) = (T(T+1) - c(c+1)) / 2, i.e. ~2 * 2 * L * n_heads * head_dim * T^2 / 2
    for a whole prompt.
    """
    pairs = (total_len * (total_len + 1) - cached_len * (cached_len + 1)) // 2
    return 4 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * head_dim(cfg) * pairs


def prefill_flops(cfg: dict, prompt_lens: Sequence[int], cached_lens: Sequence[int] | None = None) -> int:
    """FLOPs to prefill these prompts: for each, with T its length and c its cached prefix,

        2 * L * layer_matmul_params * (T - c)        (the layers' matmuls, on the uncached tokens)
      + 2 * vocab * hidden                          (the LM head, on the last position only)
      + causal_attention_flops(T, c)               (~2 * 2 * L * n_heads * head_dim * T^2 / 2)
    """
    cached = list(cached_lens) if cached_lens is not None else [0] * len(prompt_lens)
    per_token = 2 * cfg["num_hidden_layers"] * layer_matmul_params(cfg)
    total = 0
    for t, c in zip(prompt_lens, cached, strict=True):
        total += per_token * (t - c) + 2 * lm_head_params(cfg) + causal_attention_flops(cfg, t, c)
    return total


def decode_steps(out_lens: Sequence[int], max_batch: int) -> int:
    """Fewest decode steps that produce these outputs with at most `max_batch` sequences a step.

    The prefill yields each request's first token, so a request needs out - 1 decode steps; the
    longest request and the batch limit each bound the count from below.
    """
    work = [max(o - 1, 0) for o in out_lens]
    if not work or max(work) == 0:
        return 0
    return max(max(work), math.ceil(sum(work) / max_batch))


def decode_kv_bytes(cfg: dict, prompt_lens: Sequence[int], out_lens: Sequence[int], dtype_bytes: int = 2) -> int:
    """KV bytes all decode steps read: the step making token k + 1 (k = 1 .. out - 1) reads the
    KV of prompt + k positions, so each request reads sum_k (prompt + k) tokens' KV."""
    tokens = 0
    for p, o in zip(prompt_lens, out_lens, strict=True):
        k = max(o - 1, 0)
        tokens += k * p + k * (k + 1) // 2
    return tokens * kv_bytes_per_token(cfg, dtype_bytes)


def decode_bytes(cfg: dict, prompt_lens: Sequence[int], out_lens: Sequence[int], max_batch: int,
                 dtype_bytes: int = 2) -> int:
    """All decode bytes: weights once per step (fewest steps at `max_batch`) plus the KV reads."""
    return (decode_steps(out_lens, max_batch) * weight_bytes_per_step(cfg, dtype_bytes)
            + decode_kv_bytes(cfg, prompt_lens, out_lens, dtype_bytes))


@dataclass
class Ceilings:
    """What the machine measured: copy bandwidth (bytes/s) and matmul rate (FLOP/s)."""

    bandwidth: float
    matmul_rate: float
    note: str = ""


def roofline_time(cfg: dict, prompt_lens: Sequence[int], out_lens: Sequence[int], ceilings: Ceilings,
                  max_batch: int, cached_lens: Sequence[int] | None = None, dtype_bytes: int = 2) -> float:
    """Issue 5's roofline time: prefill FLOPs / matmul rate + decode bytes / bandwidth (seconds)."""
    flops = prefill_flops(cfg, prompt_lens, cached_lens)
    nbytes = decode_bytes(cfg, prompt_lens, out_lens, max_batch, dtype_bytes)
    return flops / ceilings.matmul_rate + nbytes / ceilings.bandwidth


def decode_roofline_tok_s(cfg: dict, prompt_len: int, n_tokens: int, bandwidth: float, dtype_bytes: int = 2) -> float:
    """Batch-1 decode tok/s at the bandwidth roofline for the steps making tokens 2..n_tokens
    (the ones a t(N) - t(1) measurement times): (N - 1) / sum of step bytes / bandwidth."""
    steps = range(1, n_tokens)
    total = sum(decode_step_bytes(cfg, 1, prompt_len + k, dtype_bytes) for k in steps)
    return (n_tokens - 1) * bandwidth / total if total else float("inf")


# ---- measuring the ceilings ---------------------------------------------------------------------


def _median_cuda_ms(fn: Any, reps: int, torch: Any) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _median_cpu_ms(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(device: str, nbytes: int | None = None, reps: int = 10) -> float:
    """Copy bandwidth in bytes/s: (read + written bytes) / time of `dst.copy_(src)`, median.

    2 GiB on a GPU (well past any cache); 64 MiB on CPU, where it is only a rough memcpy figure.
    """
    import torch

    cuda = str(device).startswith("cuda")
    nbytes = nbytes or (2 << 30 if cuda else 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()  # warm-up
    ms = _median_cuda_ms(fn, reps, torch) if cuda else _median_cpu_ms(fn, reps)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def measure_matmul_rate(device: str, n: int | None = None, reps: int = 20) -> float:
    """Matmul rate in FLOP/s: 2 * n^3 / time, median; bf16 8192^3 on a GPU, fp32 512^3 on CPU."""
    import torch

    cuda = str(device).startswith("cuda")
    n = n or (8192 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    for _ in range(10):  # warm-up: cuBLAS heuristics, clocks ramping up
        fn()
    ms = _median_cuda_ms(fn, reps, torch) if cuda else _median_cpu_ms(fn, reps)
    del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n**3 / (ms / 1e3)


def measure_ceilings(device: str) -> Ceilings:
    cuda = str(device).startswith("cuda")
    note = "" if cuda else "CPU: a 64 MiB memcpy and an fp32 512^3 matmul, rough figures only"
    return Ceilings(measure_copy_bandwidth(device), measure_matmul_rate(device), note)
