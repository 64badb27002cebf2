"""Qwen2 (biased QKV) and Qwen3 (per-head q/k RMSNorm, no QKV bias): Llama with two switches."""

from __future__ import annotations

from typing import Any

import torch

from distllm.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        self.spec_overrides = {"qkv_bias": True}
        super().__init__(hf_config, dtype)


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        self.spec_overrides = {"qk_norm": True, "attention_bias": bool(hf_config.get("attention_bias", False))}
        super().__init__(hf_config, dtype)


__all__ = ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "DecoderSpec"]
