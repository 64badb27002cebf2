"""A per-GPU memory plan computed from the model config alone: no weights are read, nothing is
allocated. `distllm plan` prints it; the offload code can use it to pick `cpu_offload_gb`.

All sizes are bytes; "GB" in the arguments (gpu_memory_gb, cpu_offload_gb) means GiB = 2**30,
as vLLM's `cpu_offload_gb` does.

Per-rank budget, as `worker/memory.py` sizes the KV cache on a GPU:

    usable  = gpu_memory * gpu_memory_utilization
    kv      = usable - weights_on_gpu - buffers - activation_peak - cuda_graph_pool
              - cuda_context - offload_staging
    blocks  = kv // KVCacheSpec.block_bytes      (2 * layers * block_size * kv_heads_per_rank * head_dim * elem)

Weights (per rank, counted exactly as distllm/layers shard them; e = dtype bytes):
    embed     ceil(V / tp) * H                      (vocab padded so every rank holds as many rows)
    lm_head   ceil(V / tp) * H, or 0 when tied     (the tied parameter is counted once)
    per layer (Hq = heads / tp; Hkv = kv_heads / tp, or 1 when tp >= kv_heads: KV heads replicated)
      qkv     (Hq + 2 Hkv) * D * H  (+ (Hq + 2 Hkv) * D bias: attention_bias or Qwen2's qkv bias)
      o_proj  H * heads * D / tp    (+ H bias when attention_bias: replicated)
      q/k norm  2 * D               (Qwen3)
      gate_up 2 * I / tp * H        (+ 2 * I / tp bias when mlp_bias)
      down    H * I / tp            (+ H bias when mlp_bias)
      norms   2 * H
    final norm H
Buffers: the rotary cos/sin cache, max_position_embeddings * 2 * D float32 (one per model).

Activation peak (the largest batch the profile runs: T = min(max_num_batched_tokens,
max_num_seqs * max_model_len) tokens, R = min(max_num_seqs, T) logit rows):
    layer   = T * [2 H e                                  residual + hidden stream
                   + max(8 H,                             RMSNorm's float32 temporaries
                         e (qkv_r + (Hq + Hkv) D + Hq D + H) + 2 D (4 + e),   attention: qkv, rotated q/k,
                                                                              attention out, o_proj out, cos/sin
                         e (3 I / tp + H))]               MLP: gate_up, SiLU*up, down out
            + 24 T                                        int64 ids, positions, slot mapping
    logits  = T H e + R [ceil(V/tp) e (+ tp * ceil(V/tp) e gathered when tp > 1) + 8 V]
              (final hidden; logits in dtype, then .float() and softmax in float32, as the profile does)
    peak    = max(layer, logits)

CUDA graph pool (graphs share one pool, captured largest first, so the pool is the largest
capture's working set): max over captured batch sizes b (worker/cuda_graph.graph_batch_sizes) of
    layer(T = b) + split-KV partials b * Hq * splits(b) * (D + 2) * 4
with splits(b) = min(32, ceil(2 * 132 / (b * Hkv)), max_model_len // 512) (the decode heuristic
of ops/triton_paged_attention, for an H100's 132 SMs), plus the static input buffers
(ids/positions/slots 24 n, block table n * ceil(max_model_len / block_size) * 4, seq lens and
query starts 8 n, hidden n H e; n = the largest captured size). The engine takes the pool from
the (1 - gpu_memory_utilization) margin (it captures after sizing the KV cache); the plan
subtracts it from the KV budget, so its KV figures are conservative by that amount.

CUDA context: a fixed estimate (default 512 MiB) for the CUDA context, cuBLAS workspaces and
Triton modules that the engine sees as "used by others" when it profiles.

CPU offload of G GiB: min(G GiB, the decoder layers' weights) leaves the GPU (embedding, LM
head and final norm stay); the layers are streamed through a staging buffer of
`offload_staging_layers` (default 2) layers' weights, which the plan charges whenever offload is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_CUDA_CONTEXT_BYTES = 512 * MiB
DEFAULT_SMS = 132  # H100 SXM; only the split-KV partials in the graph pool depend on it
_PROGRAMS_PER_SM = 4  # ops/triton_paged_attention.PROGRAMS_PER_SM
_MAX_SPLITS = 64  # ops/triton_paged_attention.MAX_SPLITS

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}.") from None


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b}).")
    return a // b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class DecoderShape:
    """What the decoder's parameter count depends on (models/llama.DecoderSpec, no torch)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @staticmethod
    def from_hf(cfg: dict[str, Any], architecture: str | None = None) -> "DecoderShape":
        arch = architecture or (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in _DECODERS:
            raise ValueError(f"distllm plan supports the decoder architectures {', '.join(_DECODERS)}; got {arch!r}.")
        heads = int(cfg["num_attention_heads"])
        shape = DecoderShape(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            max_position=int(cfg.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
        # The switches models/qwen.py sets on top of the Llama decoder.
        if arch == "Qwen2ForCausalLM":
            shape = replace(shape, qkv_bias=True)
        elif arch == "Qwen3ForCausalLM":
            shape = replace(shape, qk_norm=True)
        return shape


@dataclass(frozen=True)
class RankShape:
    """One rank's shard sizes, as the parallel layers compute them."""

    tp: int
    vocab_per_rank: int
    heads: int
    kv_heads: int  # per rank; 1 (replicated) when tp >= num_kv_heads
    kv_replicas: int
    intermediate: int  # per rank
    qkv_out: int  # (heads + 2 kv_heads) * head_dim


def rank_shape(s: DecoderShape, tp: int) -> RankShape:
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}.")
    heads = _divide(s.num_heads, tp, "num_attention_heads")
    if tp >= s.num_kv_heads:
        if tp % s.num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads ({s.num_kv_heads}) when it is larger."
            )
        kv, replicas = 1, tp // s.num_kv_heads
    else:
        kv, replicas = _divide(s.num_kv_heads, tp, "num_key_value_heads"), 1
    _divide(2 * s.intermediate_size, tp, "output features")  # MergedColumnParallelLinear's check
    inter = _divide(s.intermediate_size, tp, "input features")  # RowParallelLinear's check
    return RankShape(tp, _cdiv(s.vocab_size, tp), heads, kv, replicas, inter, (heads + 2 * kv) * s.head_dim)


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightCount:
    """Parameter counts (elements) of one rank."""

    embed: int
    lm_head: int  # 0 when tied to the embedding
    per_layer: int
    num_layers: int
    final_norm: int

    @property
    def layers(self) -> int:
        return self.per_layer * self.num_layers

    @property
    def total(self) -> int:
        return self.embed + self.lm_head + self.layers + self.final_norm


def count_weights(s: DecoderShape, tp: int) -> WeightCount:
    r = rank_shape(s, tp)
    H, D = s.hidden_size, s.head_dim
    qkv_out = (r.heads + 2 * r.kv_heads) * D
    layer = qkv_out * H + (qkv_out if (s.attention_bias or s.qkv_bias) else 0)
    layer += H * (s.num_heads * D // tp) + (H if s.attention_bias else 0)
    layer += 2 * D if s.qk_norm else 0
    layer += 2 * r.intermediate * H + (2 * r.intermediate if s.mlp_bias else 0)
    layer += H * r.intermediate + (H if s.mlp_bias else 0)
    layer += 2 * H
    embed = r.vocab_per_rank * H
    return WeightCount(
        embed=embed,
        lm_head=0 if s.tie_word_embeddings else embed,
        per_layer=layer,
        num_layers=s.num_layers,
        final_norm=H,
    )


def buffer_bytes(s: DecoderShape) -> int:
    """The rotary cos/sin cache (float32, max_position x 2 * head_dim), one per model."""
    return s.max_position * 2 * s.head_dim * 4


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(s: DecoderShape, tp: int, e: int, tokens: int) -> int:
    r = rank_shape(s, tp)
    H, D, T = s.hidden_size, s.head_dim, tokens
    qkv_out = (r.heads + 2 * r.kv_heads) * D
    attn = e * (qkv_out + (r.heads + r.kv_heads) * D + r.heads * D + H) + 2 * D * (4 + e)
    mlp = e * (3 * r.intermediate + H)
    norm = 8 * H
    return T * (2 * H * e + max(norm, attn, mlp)) + 24 * T


def logits_activation_bytes(s: DecoderShape, tp: int, e: int, tokens: int, rows: int) -> int:
    r = rank_shape(s, tp)
    local = r.vocab_per_rank * e
    gathered = tp * r.vocab_per_rank * e if tp > 1 else 0
    return tokens * s.hidden_size * e + rows * (local + gathered + 8 * s.vocab_size)


def profile_batch(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> tuple[int, int]:
    """(tokens, logit rows) of the largest batch worker/memory.profile_num_gpu_blocks runs."""
    tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    return tokens, max(1, min(max_num_seqs, tokens))


def activation_peak_bytes(s: DecoderShape, tp: int, e: int, max_num_batched_tokens: int, max_num_seqs: int,
                          max_model_len: int) -> int:
    tokens, rows = profile_batch(max_num_batched_tokens, max_num_seqs, max_model_len)
    return max(layer_activation_bytes(s, tp, e, tokens), logits_activation_bytes(s, tp, e, tokens, rows))


def graph_batch_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """worker/cuda_graph.graph_batch_sizes (repeated here so the plan needs no torch)."""
    top = min(max_num_seqs, limit)
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
    if top not in sizes:
        sizes.append(top)
    return sorted(set(sizes))


def cuda_graph_pool_bytes(s: DecoderShape, tp: int, e: int, max_num_seqs: int, max_model_len: int, block_size: int,
                          sms: int = DEFAULT_SMS) -> int:
    r = rank_shape(s, tp)
    sizes = graph_batch_sizes(max_num_seqs)
    pool = 0
    for b in sizes:
        block_n = 64 if s.head_dim <= 128 else 32  # the paged-attention kernel's KV-loop block
        splits = max(1, min(_MAX_SPLITS, (_PROGRAMS_PER_SM * sms) // (b * r.kv_heads), _cdiv(max_model_len, block_n)))
        partials = b * r.heads * splits * (s.head_dim + 2) * 4 if splits > 1 else 0
        pool = max(pool, layer_activation_bytes(s, tp, e, b) + partials)
    n = sizes[-1]
    static = 24 * n + n * _cdiv(max_model_len, block_size) * 4 + 8 * n + 4 + n * s.hidden_size * e
    return pool + static


def kv_block_bytes(s: DecoderShape, tp: int, e: int, block_size: int) -> int:
    """KVCacheSpec.block_bytes for this rank."""
    return 2 * s.num_layers * block_size * rank_shape(s, tp).kv_heads * s.head_dim * e


# ----------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """One GPU's plan (every rank holds the same amounts)."""

    shape: DecoderShape
    dtype: str
    tp: int
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    max_model_len: int
    model_max_len: int  # the model's own limit (config)
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enforce_eager: bool
    cpu_offload_gb: float
    weights: WeightCount
    weight_bytes: int  # all of this rank's weights
    offloaded_bytes: int  # of those, held in host memory
    offload_staging_bytes: int
    buffer_bytes: int
    activation_bytes: int
    activation_tokens: int
    cuda_graph_bytes: int
    cuda_context_bytes: int
    kv_block_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * self.gpu_memory_utilization)

    @property
    def weights_on_gpu_bytes(self) -> int:
        return self.weight_bytes - self.offloaded_bytes

    @property
    def non_kv_bytes(self) -> int:
        return (self.weights_on_gpu_bytes + self.offload_staging_bytes + self.buffer_bytes + self.activation_bytes
                + self.cuda_graph_bytes + self.cuda_context_bytes)

    @property
    def kv_budget_bytes(self) -> int:
        return self.usable_bytes - self.non_kv_bytes

    @property
    def num_blocks(self) -> int:
        return max(0, self.kv_budget_bytes // self.kv_block_bytes)

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def blocks_needed(self) -> int:
        """Blocks one sequence of max_model_len tokens needs (the engine's start-up check)."""
        return _cdiv(self.max_model_len, self.block_size)

    @property
    def fits(self) -> bool:
        return self.num_blocks >= self.blocks_needed

    @property
    def offloadable_bytes(self) -> int:
        return self.weights.layers * dtype_bytes(self.dtype)

    @property
    def layer_bytes(self) -> int:
        return self.weights.per_layer * dtype_bytes(self.dtype)


def plan_memory(
    shape: DecoderShape,
    dtype: str,
    *,
    tp: int = 1,
    gpu_memory_bytes: int,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int,
    model_max_len: int | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    block_size: int = 16,
    cpu_offload_gb: float = 0.0,
    enforce_eager: bool = False,
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES,
    offload_staging_layers: int = 2,
) -> MemoryPlan:
    e = dtype_bytes(dtype)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
    if cpu_offload_gb < 0:
        raise ValueError(f"cpu_offload_gb must be >= 0, got {cpu_offload_gb}.")
    w = count_weights(shape, tp)
    weight_bytes = w.total * e
    offloadable = w.layers * e
    offloaded = min(int(cpu_offload_gb * GiB), offloadable)
    staging = min(offload_staging_layers, shape.num_layers) * w.per_layer * e if offloaded > 0 else 0
    notes = []
    if cpu_offload_gb > 0 and int(cpu_offload_gb * GiB) > offloadable:
        notes.append(f"cpu_offload_gb={cpu_offload_gb:g} is more than the decoder layers' weights "
                     f"({offloadable / GiB:.2f} GiB): offload is capped there (embedding and LM head stay on the GPU).")
    tokens, _ = profile_batch(max_num_batched_tokens, max_num_seqs, max_model_len)
    return MemoryPlan(
        shape=shape, dtype=dtype, tp=tp, gpu_memory_bytes=int(gpu_memory_bytes),
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        model_max_len=model_max_len or max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, enforce_eager=enforce_eager,
        cpu_offload_gb=cpu_offload_gb, weights=w, weight_bytes=weight_bytes, offloaded_bytes=offloaded,
        offload_staging_bytes=staging, buffer_bytes=buffer_bytes(shape),
        activation_bytes=activation_peak_bytes(shape, tp, e, max_num_batched_tokens, max_num_seqs, max_model_len),
        activation_tokens=tokens,
        cuda_graph_bytes=0 if enforce_eager else cuda_graph_pool_bytes(shape, tp, e, max_num_seqs, max_model_len, block_size),
        cuda_context_bytes=cuda_context_bytes, kv_block_bytes=kv_block_bytes(shape, tp, e, block_size), notes=notes,
    )


def with_max_model_len(plan: MemoryPlan, max_model_len: int) -> MemoryPlan:
    """The same plan for another max_model_len (activations and graph buffers depend on it)."""
    e = dtype_bytes(plan.dtype)
    s = plan.shape
    tokens, _ = profile_batch(plan.max_num_batched_tokens, plan.max_num_seqs, max_model_len)
    return replace(
        plan, max_model_len=max_model_len, activation_tokens=tokens,
        activation_bytes=activation_peak_bytes(s, plan.tp, e, plan.max_num_batched_tokens, plan.max_num_seqs, max_model_len),
        cuda_graph_bytes=0 if plan.enforce_eager else cuda_graph_pool_bytes(
            s, plan.tp, e, plan.max_num_seqs, max_model_len, plan.block_size),
    )


def with_offload(plan: MemoryPlan, cpu_offload_gb: float, offload_staging_layers: int = 2) -> MemoryPlan:
    e = dtype_bytes(plan.dtype)
    offloaded = min(int(cpu_offload_gb * GiB), plan.offloadable_bytes)
    staging = min(offload_staging_layers, plan.shape.num_layers) * plan.weights.per_layer * e if offloaded > 0 else 0
    return replace(plan, cpu_offload_gb=cpu_offload_gb, offloaded_bytes=offloaded, offload_staging_bytes=staging,
                   notes=list(plan.notes))


def largest_max_model_len(plan: MemoryPlan) -> int:
    """The largest max_model_len (<= the model's limit) for which one whole sequence fits in the KV
    cache, 0 when not even one token fits. Fitting is monotone in the length (longer: fewer blocks
    left, more needed), so a binary search finds the boundary."""
    lo, hi = 0, plan.model_max_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if with_max_model_len(plan, mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def offload_needed_gb(plan: MemoryPlan, tokens: int | None = None) -> float | None:
    """The least cpu_offload_gb (in 0.01 GiB steps) with KV room for `tokens` (default one
    max_model_len sequence); None when even offloading every layer is not enough."""
    tokens = plan.max_model_len if tokens is None else tokens
    need = _cdiv(tokens, plan.block_size)
    if with_offload(plan, 0.0).num_blocks >= need:
        return 0.0
    full = with_offload(plan, plan.offloadable_bytes / GiB)
    if full.num_blocks < need:
        return None
    lo, hi = 1, math.ceil(plan.offloadable_bytes / GiB * 100)  # in units of 0.01 GiB
    while lo < hi:
        mid = (lo + hi) // 2
        if with_offload(plan, mid / 100).num_blocks >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo / 100


# ----------------------------------------------------------------------------- printing


def fmt_bytes(n: int | float) -> str:
    n = float(n)
    if n == 0:
        return "0"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def format_plan(plan: MemoryPlan, title: str = "", offload: MemoryPlan | None = None,
                extra_lines: list[str] | None = None) -> str:
    """A table: one column for the plan as asked, one for the offload variant when given."""
    cols = [plan] + ([offload] if offload is not None else [])
    heads = ["per GPU" if plan.offloaded_bytes == 0 else f"offload {plan.cpu_offload_gb:g} GiB"]
    if offload is not None:
        heads.append(f"offload {offload.cpu_offload_gb:g} GiB")
    w = plan.weights
    s = plan.shape
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"{plan.dtype}, tp={plan.tp}, block_size={plan.block_size}, max_num_seqs={plan.max_num_seqs}, "
        f"max_num_batched_tokens={plan.max_num_batched_tokens}, max_model_len={plan.max_model_len} "
        f"(model limit {plan.model_max_len})"
    )
    lines.append(
        f"GPU memory: {fmt_bytes(plan.gpu_memory_bytes)} x {plan.gpu_memory_utilization:g} = "
        f"{fmt_bytes(plan.usable_bytes)} usable per GPU ({plan.tp} GPU{'s' if plan.tp > 1 else ''})"
    )
    lines.append("")

    rows: list[tuple[str, list[str]]] = []
    rows.append(("weights (all)", [fmt_bytes(p.weight_bytes) for p in cols]))
    rows.append(("  offloaded to CPU", [fmt_bytes(p.offloaded_bytes) for p in cols]))
    rows.append(("  on GPU", [fmt_bytes(p.weights_on_gpu_bytes) for p in cols]))
    rows.append(("offload staging buffer", [fmt_bytes(p.offload_staging_bytes) for p in cols]))
    rows.append(("rotary cache", [fmt_bytes(p.buffer_bytes) for p in cols]))
    rows.append((f"activation peak ({plan.activation_tokens} tok)", [fmt_bytes(p.activation_bytes) for p in cols]))
    graph_label = "CUDA graph pool" + (" (eager)" if plan.enforce_eager else
                                       f" (bs 1..{graph_batch_sizes(plan.max_num_seqs)[-1]})")
    rows.append((graph_label, [fmt_bytes(p.cuda_graph_bytes) for p in cols]))
    rows.append(("CUDA context (est.)", [fmt_bytes(p.cuda_context_bytes) for p in cols]))
    rows.append(("KV cache budget", [fmt_bytes(p.kv_budget_bytes) for p in cols]))
    rows.append(("KV block size", [fmt_bytes(p.kv_block_bytes) for p in cols]))
    rows.append(("KV cache blocks", [str(p.num_blocks) for p in cols]))
    rows.append(("KV cache tokens", [str(p.kv_tokens) for p in cols]))
    rows.append((f"max_model_len {plan.max_model_len} fits", ["yes" if p.fits else "NO" for p in cols]))
    rows.append(("largest max_model_len", [str(largest_max_model_len(p)) for p in cols]))
    rows.append(("full-length sequences", [str(p.kv_tokens // max(1, p.max_model_len)) for p in cols]))
    width = max(len(r[0]) for r in rows) + 2
    cw = max(14, *(len(h) for h in heads)) + 2
    lines.append(" " * width + "".join(h.rjust(cw) for h in heads))
    for label, vals in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(cw) for v in vals))
    lines.append("")
    lines.append(
        f"weights per GPU: {w.total / 1e6:.2f}M parameters = embedding {w.embed / 1e6:.2f}M"
        f" ({_cdiv(s.vocab_size, plan.tp)} of {s.vocab_size} rows)"
        + (", LM head tied" if w.lm_head == 0 else f", LM head {w.lm_head / 1e6:.2f}M")
        + f", {s.num_layers} layers x {w.per_layer / 1e6:.3f}M, final norm {w.final_norm}"
    )
    r = rank_shape(s, plan.tp)
    lines.append(
        f"per GPU: {r.heads} query heads, {r.kv_heads} KV head{'s' if r.kv_heads > 1 else ''}"
        + (f" (replicated on {r.kv_replicas} GPUs)" if r.kv_replicas > 1 else "")
        + f", head_dim {s.head_dim}, MLP {r.intermediate} of {s.intermediate_size}"
    )
    base = with_offload(plan, 0.0)
    per_gib = GiB // plan.kv_block_bytes
    lines.append(
        f"offload: each GiB of cpu_offload_gb frees 1 GiB of layer weights (= {per_gib} KV blocks, {per_gib * plan.block_size} "
        f"tokens) up to {fmt_bytes(plan.offloadable_bytes)}; offload also costs a {fmt_bytes(min(2, s.num_layers) * plan.layer_bytes)} "
        "staging buffer (2 layers) and host-to-device copies every step."
    )
    need = offload_needed_gb(base)
    if need is None:
        lines.append(f"offload: max_model_len {plan.max_model_len} does not fit even with every layer offloaded; "
                     "lower max_model_len / max_num_batched_tokens or raise tp.")
    elif need > 0:
        lines.append(f"offload: cpu_offload_gb >= {need:.2f} makes room for one {plan.max_model_len}-token sequence.")
    else:
        lines.append("offload: not needed, the weights and one max_model_len sequence fit without it.")
    for p in cols:
        lines.extend(f"note: {n}" for n in p.notes)
    lines.extend(extra_lines or [])
    return "\n".join(lines)
