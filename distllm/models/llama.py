"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral shape), also the base of Qwen2 and Qwen3.

The model file knows nothing of parallelism beyond using the parallel layers; with tp size 1
they are plain layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from distllm.distributed.parallel_state import get_tp_size
from distllm.layers.attention import Attention
from distllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distllm.layers.norm import RMSNorm
from distllm.layers.rotary import RotaryEmbedding
from distllm.models.weights import load_named_weights


@dataclass
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v and o (Llama's flag)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False

    @staticmethod
    def from_hf(cfg: dict[str, Any], **overrides: Any) -> "DecoderSpec":
        heads = cfg["num_attention_heads"]
        spec = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=cfg.get("rope_scaling") or _rope_scaling_from_parameters(cfg.get("rope_parameters")),
            max_position=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
        spec.update(overrides)
        return DecoderSpec(**spec)


def _rope_scaling_from_parameters(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers 5 folds rope_theta and rope_scaling into `rope_parameters`."""
    if not params or params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def fuses_all_reduce(spec: DecoderSpec) -> bool:
    """Whether the row-parallel o_proj / down_proj leave their sum over TP ranks to the next
    norm (RMSNorm.forward_all_reduce). Not with biases: a bias must be added once, after the sum."""
    return get_tp_size() > 1 and not spec.attention_bias and not spec.mlp_bias


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.attention_bias or spec.qkv_bias, dtype
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        # Under TP the sum over ranks is left to the next norm (one fused kernel: see DecoderLayer).
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.attention_bias, dtype,
                                        reduce_results=not fuses_all_reduce(spec))
        self.rotary_emb = rotary
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, spec.head_dim, spec.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        # Qwen3's per-head norms, the rotary and the KV-cache store: one kernel on CUDA.
        norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        out = self.attn.forward_rotary(positions, q, k, v, self.rotary_emb, *norms)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, [spec.intermediate_size] * 2, spec.mlp_bias, dtype
        )
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, dtype,
                                           reduce_results=not fuses_all_reduce(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode: SiLU-and-mul is the gate/up GEMV's epilogue; otherwise down_proj applies it.
        h = self.gate_up_proj.forward_silu_and_mul(x)
        if h is not None:
            return self.down_proj(h)
        return self.down_proj(self.gate_up_proj(x), gated=True)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = DecoderAttention(spec, layer_idx, dtype, rotary)
        self.mlp = DecoderMLP(spec, dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.fused_all_reduce = fuses_all_reduce(spec)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the embeddings (residual None), else the previous layer's MLP output. Under TP
        (fused_all_reduce) either is still this rank's partial sum, as this layer's is on return."""
        if residual is None and self.fused_all_reduce:
            x, residual = self.input_layernorm.forward_all_reduce(x, None)
        elif residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self._add_norm(self.input_layernorm, x, residual)
        x = self.self_attn(positions, x)
        x, residual = self._add_norm(self.post_attention_layernorm, x, residual)
        return self.mlp(x), residual

    def _add_norm(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_all_reduce:  # all-reduce + residual add + RMSNorm, one kernel on NVLink
            return norm.forward_all_reduce(x, residual)
        return norm(x, residual)


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, dtype)
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope_theta, spec.rope_scaling)
        self.layers = nn.ModuleList([DecoderLayer(spec, i, dtype, rotary) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.fused_all_reduce = fuses_all_reduce(spec)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Under TP the embedding's sum over ranks is the first layer's, fused with its norm.
        x = self.embed_tokens(input_ids, reduce=not self.fused_all_reduce)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        if self.fused_all_reduce:  # the last layer's MLP output is still a partial sum
            x, _ = self.norm.forward_all_reduce(x, residual)
        else:
            x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names folded into our stacked parameters: (ours, theirs, shard id).
    stacked_params = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    spec_overrides: dict[str, Any] = {}

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.spec = DecoderSpec.from_hf(hf_config, **self.spec_overrides)
        self.model = DecoderModel(self.spec, dtype)
        self.lm_head = ParallelLMHead(self.spec.vocab_size, self.spec.hidden_size, dtype)
        if self.spec.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        skip = ("rotary_emb.inv_freq",)
        if self.spec.tie_word_embeddings:
            skip += ("lm_head.weight",)
        return load_named_weights(self, weights, self.stacked_params, skip_suffixes=skip)
