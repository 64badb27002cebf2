"""y = x @ W.T (+ bias) for a few rows of x (decode) against a small bf16/fp16 weight, in Triton.

cuBLAS picks tiles for decode shapes of small models that leave most SMs idle: SmolLM2's
960 x 576 qkv projection at batch 1 runs as ~15 programs and takes ~3.8 us on an H200, where a
kernel's floor inside a CUDA graph is ~1.2 us. Here every program takes BLOCK_N weight rows and
one row of x, so the grid covers the SMs, and streams its rows' K in BLOCK_K steps into an
element-wise fp32 accumulator that is reduced once at the end.

Used (``dispatch.linear``) for CUDA tensors with M <= MAX_M rows and a weight of at most
MAX_WEIGHT_ELEMENTS, and for one row of x against a larger weight of at most MAX_LARGE_N rows:
cuBLAS runs a 4096 x 4096 GEMV from HBM at ~2.5 TB/s on an H200 where this kernel, streaming K
in pipelined 1024-wide steps, reaches ~3.0 TB/s; with more rows (an 8B model's fused gate/up,
LM heads) cuBLAS has parallelism enough and is as fast or faster. cuBLAS everywhere else, but
for a gated MLP's gate/up at one row (``gemv_gate_up``), where SiLU-and-mul as the epilogue
saves a launch: 55.1 us against cuBLAS + SiLU-and-mul's 61.4 for the 8B shape on an H200.
``DISTLLM_GEMV=0`` turns it off; ``DISTLLM_GEMV_TILES=oneshot|table`` picks the tile rule;
``DISTLLM_GEMV_FORCE_TILES`` sets the tiles of given weight shapes (to time them end to end).
``benchmarks/bench_gemv.py`` measures it against cuBLAS and prints the figures CONFIGS and the
limits come from.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl
from distllm.ops.triton_activation import silu_mul

# On by default with the "oneshot" tiles: on an H200, SmolLM2-135M batch-1 decode went from
# 1069.5 tok/s on cuBLAS to 1387.0 with this kernel (benchmarks/README.md). Its first tiles (the
# "table" rule, chosen with weights hot in L2) had made it slower: 1040 vs 1168 tok/s.
ENABLED = os.environ.get("DISTLLM_GEMV", "1").strip().lower() not in ("0", "false", "no", "off")
MAX_M = int(os.environ.get("DISTLLM_GEMV_MAX_M", "2"))
# The MLP's down projection takes [gate | up] and applies SiLU-and-mul as it loads x (one
# launch less per layer, bit-identical output). Off until measured on a GPU.
GATED = os.environ.get("DISTLLM_GEMV_SILU", "0").strip().lower() in ("1", "true", "yes", "on")
# Up to SmolLM2's largest decode weight (3072 x 576), where the end-to-end gain was measured,
# at M <= MAX_M with one-shot tiles; larger weights follow the MAX_LARGE_N rule below.
MAX_WEIGHT_ELEMENTS = int(os.environ.get("DISTLLM_GEMV_MAX_ELEMENTS", str(2 << 20)))
# Weights above MAX_WEIGHT_ELEMENTS take the kernel at M = 1 when they have at most this many
# rows (benchmarks/bench_gemv.py --large, H200, weights from HBM, best tile vs cuBLAS:
# Llama-3.1-8B 4096x4096 11.0 vs 13.6 us, 4096x14336 29.7 vs 31.4, TP=2 shards 3072x4096
# 8.9 vs 12.2 and 4096x7168 16.5 vs 20.1, TP=4 7168x4096 16.7 vs 19.6; but 14336x4096 30.3 vs
# 30.0, 28672x4096 56.9 vs 55.3 and LM heads of 32K-128K rows no faster).
MAX_LARGE_N = int(os.environ.get("DISTLLM_GEMV_MAX_N", "8192"))
MAX_LARGE_M = 1
# A gated MLP's gate/up projection with SiLU-and-mul as its epilogue (gemv_gate_up), at any
# weight size: it saves the activation's launch and the [gate | up] round trip. Rows of x per
# launch: at most GATE_UP_MAX_M. DISTLLM_GEMV_GATE_UP=0 turns it off.
GATE_UP = os.environ.get("DISTLLM_GEMV_GATE_UP", "1").strip().lower() not in ("0", "false", "no", "off")
GATE_UP_MAX_M = 1
# Tiles of a large gate (N x K past MAX_WEIGHT_ELEMENTS): two rows of gate and two of up a
# program (GATE_UP_NARROW_TILES), except from GATE_UP_WIDE_N[0] to GATE_UP_WIDE_N[1] outputs,
# which take the plain GEMV's 4-row tiles. On an H200 (bench_gemv.py --gate-up, weights from HBM):
# the 8B gate/up (14336 outputs, K 4096) 55.1 us narrow against 58.7 with 4-row tiles and 61.4
# for cuBLAS + SiLU-and-mul; its TP=2 shard (7168) ties (29.9-30.0 us) and TP=2 decode was 1%
# slower narrow; its TP=4 shard (3584) 15.45 us narrow against 21.27 with the plain GEMV's
# 8-row tiles and 19.45 for cuBLAS + SiLU-and-mul, and 4 x H200 TP=4 decode (bench_tp_decode.py)
# 541.6 tok/s narrow against 522.9 on cuBLAS + SiLU-and-mul in the same call (8-row tiles had
# lost 9% to cuBLAS). Compiled for sm_90 offline with the launcher's divisibility hints
# (benchmarks/kernel_aot.py, Triton 3.6), 8-row tiles take 165 registers a thread (three
# programs an SM), 4-row tiles 96, the narrow ones 64 (eight); none spills.
GATE_UP_WIDE_N, GATE_UP_NARROW_TILES = (4097, 8192), (2, 1024, 4, 4)
# Large weights: 1024-wide K steps, 4 stages of loads in flight; BLOCK_N 8 for up to 4096 rows
# (fewer, longer programs) and 4 above. Up to LARGE_ONESHOT_MAX_N rows the one-shot tiles keep
# more programs (TP=4 qkv shard 1536x4096: 5.7 us vs 6.4 us streaming). The 8-row tiles take
# exactly 128 registers a thread on sm_90 (kernel_aot.py): four programs an SM, so o_proj's and
# down's 512 programs run as one wave. Whatever this kernel gains must keep that: an add +
# RMSNorm tail at 136 registers made each of those GEMVs ~7 us slower (benchmarks/README.md,
# sixteenth session).
LARGE_BLOCK_K, LARGE_STAGES, LARGE_ONESHOT_MAX_N = 1024, 4, 2048
# (BLOCK_N, BLOCK_K, num_warps) by weight size: the first row whose limit holds N * K (the
# microbenchmark's best tiles, weights hot in L2).
CONFIGS: list[tuple[int, tuple[int, int, int]]] = [
    (1 << 20, (8, 256, 4)),
    (4 << 20, (8, 256, 4)),
    (1 << 62, (16, 256, 4)),
]
# "oneshot": a program loads its rows' whole K at once (BLOCK_K = K rounded up to a power of two,
# at most 2048), so a cold weight costs one HBM round trip per program instead of one per K step.
TILES = os.environ.get("DISTLLM_GEMV_TILES", "oneshot").strip().lower()
ONESHOT_TILE_ELEMENTS = 4096


def _forced_tiles(spec: str) -> dict[tuple[int, int], tuple[int, ...]]:
    """DISTLLM_GEMV_FORCE_TILES = "NxK=BN,BK,warps[,stages];..." -> {(N, K): tiles}: tiles for
    given weight shapes, to time them end to end (benchmarks/bench_tp_decode.py) on a new card."""
    forced = {}
    for item in filter(None, (v.strip() for v in spec.split(";"))):
        try:
            shape, tiles = item.split("=")
            n, k = (int(v) for v in shape.lower().split("x"))
            forced[(n, k)] = tuple(int(v) for v in tiles.split(","))
        except ValueError:
            raise ValueError(f"DISTLLM_GEMV_FORCE_TILES: expected 'NxK=BN,BK,warps[,stages]' items "
                             f"separated by ';', got {item!r}") from None
    return forced


FORCED_TILES = _forced_tiles(os.environ.get("DISTLLM_GEMV_FORCE_TILES", ""))
# L2 eviction policy of the weight loads. A decode step streams every weight once (8B: 15 GB
# through a 50 MB L2), so at the normal policy the weights push out what the step does reuse:
# residuals, norm weights, KV entries, split partials and all-reduce slots, read on the chain by
# the latency-bound kernels between the GEMVs. Marked evict-first, 8B batch-1 decode on an H200
# went from 247.1 / 245.6 / 247.0 / 246.9 to 248.9 / 248.2 / 249.9 / 249.1 tok/s (alternated in
# two calls; benchmarks/README.md, twenty-first session). DISTLLM_GEMV_EVICT=normal for A/B runs.
_EVICT = {"normal": "", "first": "evict_first"}
_EVICT_SETTING = os.environ.get("DISTLLM_GEMV_EVICT", "first").strip().lower()
if _EVICT_SETTING not in _EVICT:
    raise ValueError(f"DISTLLM_GEMV_EVICT must be one of {sorted(_EVICT)}, got {_EVICT_SETTING!r}")
WEIGHT_EVICTION = _EVICT[_EVICT_SETTING]


@triton.jit
def _x_tile(x_rows, k, mask, K, GATED: tl.constexpr):
    """x[:, k] ([BM, BK], x's dtype); GATED: silu(x[:, k]) * x[:, K + k] (x rows are [gate | up])."""
    if GATED:
        gate = tl.load(x_rows + k[None, :], mask=mask, other=0.0)
        up = tl.load(x_rows + K + k[None, :], mask=mask, other=0.0)
        return silu_mul(gate.to(tl.float32), up.to(tl.float32), gate.dtype)
    return tl.load(x_rows + k[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_PDL: tl.constexpr, GATED: tl.constexpr = False, W_EVICT: tl.constexpr = "",
):
    """y[m-tile, n-tile]: one program = BLOCK_N rows of W x BLOCK_M rows of x. BLOCK_M > 1 reads
    each weight tile once for several rows of x (a large weight then comes from HBM once).
    The first K step is peeled: its weight tile is loaded before the PDL wait (ops/pdl.py).
    GATED: x's rows are [gate | up] (2K wide) and the kernel multiplies silu(gate) * up,
    rounded exactly as the SiLU-and-mul kernel rounds it, so the MLP's activation needs no
    launch (and no round trip through memory) of its own."""
    pid_n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    mask_k = offs_k < K
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                eviction_policy=W_EVICT)  # [BN, BK]
    pdl_wait(USE_PDL)
    x = _x_tile(x_rows, offs_k, mask_m[:, None] & mask_k[None, :], K, GATED)  # [BM, BK]
    acc = w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]  # [BM, BN, BK]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                    eviction_policy=W_EVICT)  # [BN, BK]
        x = _x_tile(x_rows, k, mask_m[:, None] & mask_k[None, :], K, GATED)  # [BM, BK]
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, W_EVICT: tl.constexpr = "",
):
    """y[m, n] = silu(x[m] . W[n]) * (x[m] . W[N + n]) for the program's BLOCK_N values of n:
    W is a gated MLP's stacked [gate; up] (2N rows). Each program streams its gate rows and
    the matching up rows, so the activation is the epilogue: no [gate | up] round trip through
    memory and no SiLU-and-mul launch. Rounded as the unfused path rounds: gate and up to x's
    dtype, then silu_mul. The first K step's weight tiles are loaded before the PDL wait."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    g_rows = wg_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    u_rows = wu_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + m * stride_xm
    mask_k = offs_k < K
    wmask = mask_n[:, None] & mask_k[None, :]
    wg = tl.load(g_rows + offs_k[None, :], mask=wmask, other=0.0, eviction_policy=W_EVICT)  # [BN, BK]
    wu = tl.load(u_rows + offs_k[None, :], mask=wmask, other=0.0, eviction_policy=W_EVICT)
    pdl_wait(USE_PDL)
    x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]  # [1, BK]
    acc_g = wg.to(tl.float32) * x
    acc_u = wu.to(tl.float32) * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        wmask = mask_n[:, None] & mask_k[None, :]
        x = tl.load(x_row + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(g_rows + k[None, :], mask=wmask, other=0.0, eviction_policy=W_EVICT).to(tl.float32) * x
        acc_u += tl.load(u_rows + k[None, :], mask=wmask, other=0.0, eviction_policy=W_EVICT).to(tl.float32) * x
    ty = y_ptr.dtype.element_ty
    gate = tl.sum(acc_g, axis=1).to(ty).to(tl.float32)
    up = tl.sum(acc_u, axis=1).to(ty).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, silu_mul(gate, up, ty), mask=mask_n)


def gemv_config(n: int, k: int) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, num_warps[, num_stages]) for an [N, K] weight (TILES: "oneshot" or
    "table" for weights up to MAX_WEIGHT_ELEMENTS; streaming tiles above)."""
    if (n, k) in FORCED_TILES:
        return FORCED_TILES[(n, k)]
    if n * k > MAX_WEIGHT_ELEMENTS and n > LARGE_ONESHOT_MAX_N:
        return (8 if n <= 4096 else 4), min(LARGE_BLOCK_K, triton.next_power_of_2(k)), 4, LARGE_STAGES
    if TILES == "oneshot":
        block_k = min(2048, triton.next_power_of_2(k))
        return max(1, min(16, ONESHOT_TILE_ELEMENTS // block_k)), block_k, 4
    for limit, cfg in CONFIGS:
        if n * k <= limit:
            return cfg
    return CONFIGS[-1][1]


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> bool:
    """Is y = x @ weight.T (+ bias) one this kernel should take? ``gated``: y = silu_and_mul(x)
    @ weight.T, x's rows being [gate | up], twice the weight's K."""
    if not (ENABLED and x.dim() == 2 and weight.dim() == 2) or (gated and not GATED):
        return False
    m, (n, k) = x.shape[0], weight.shape
    if x.shape[1] != (2 * k if gated else k):
        return False
    return (
        (0 < m <= MAX_M and n * k <= MAX_WEIGHT_ELEMENTS or 0 < m <= MAX_LARGE_M and n <= MAX_LARGE_N)
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.stride(1) == 1
        and x.stride(1) == 1
        and (bias is None or (bias.dim() == 1 and bias.is_contiguous()))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, ...] | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, fp32 accumulation.
    ``gated``: x is [M, 2K] = [gate | up] and silu(gate) * up takes its place (ops/triton_activation)."""
    m, k = x.shape
    if gated:
        if k % 2:
            raise ValueError(f"gated x must be [gate | up], got an odd width {k}")
        k //= 2
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has K={k}{' (gated)' if gated else ''} but the weight is {tuple(weight.shape)}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # (BLOCK_N, BLOCK_K, num_warps[, num_stages[, BLOCK_M]]): stages pipeline the K loop's
    # loads; BLOCK_M rows of x share each weight tile.
    block_n, block_k, warps, *rest = config or gemv_config(n, k)
    extra = {"num_stages": rest[0]} if rest and rest[0] else {}
    block_m = rest[1] if len(rest) > 1 else 1
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    launch(_gemv_kernel, grid,
        x, weight, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=warps, **extra,
        GATED=gated, W_EVICT=WEIGHT_EVICTION, **launch_options(use_pdl(x)),
    )
    return y


def gate_up_config(n: int, k: int) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, num_warps[, num_stages]) for gemv_gate_up with n outputs: each program
    streams 2 x BLOCK_N rows; large gates take the narrow tiles outside GATE_UP_WIDE_N, the rest
    the plain GEMV's tiles for n rows. DISTLLM_GEMV_GATE_UP_TILES = "BN,BK,warps,stages"
    overrides them (benchmarks/bench_gemv.py --gate-up sweeps them)."""
    forced = os.environ.get("DISTLLM_GEMV_GATE_UP_TILES", "").strip()
    if forced:
        return tuple(int(v) for v in forced.split(","))
    if n * k > MAX_WEIGHT_ELEMENTS and not GATE_UP_WIDE_N[0] <= n <= GATE_UP_WIDE_N[1]:
        return GATE_UP_NARROW_TILES
    return gemv_config(n, k)


def gate_up_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Is silu_and_mul(x @ weight.T) one gemv_gate_up should take? (weight = [gate; up])"""
    return (
        GATE_UP and ENABLED and bias is None and x.dim() == 2 and weight.dim() == 2
        and 0 < x.shape[0] <= GATE_UP_MAX_M and weight.shape[0] % 2 == 0 and x.shape[1] == weight.shape[1]
        and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
        and weight.stride(1) == 1 and x.stride(1) == 1
    )


def gemv_gate_up(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [M, N] for weight = [gate; up] ([2N, K]): the gated MLP's
    first projection and its activation in one launch (see _gemv_gate_up_kernel)."""
    m, k = x.shape
    n2, kw = weight.shape
    if kw != k or n2 % 2:
        raise ValueError(f"x is [{m}, {k}] but the stacked [gate; up] weight is {tuple(weight.shape)}")
    n = n2 // 2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, *rest = config or gate_up_config(n, k)
    extra = {"num_stages": rest[0]} if rest and rest[0] else {}
    launch(_gemv_gate_up_kernel, (triton.cdiv(n, block_n), m),
           x, weight[:n], weight[n:], y, n, k, x.stride(0), weight.stride(0), y.stride(0),
           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **extra, W_EVICT=WEIGHT_EVICTION,
           **launch_options(use_pdl(x)))
    return y
