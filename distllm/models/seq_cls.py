"""Llama / Qwen2 / Qwen3 `*ForSequenceClassification`: the decoder with a bias-free `score` head.

Tasks (vLLM's): classify (last token -> head -> softmax, or sigmoid for one label), score (the same,
for one-label rerankers), reward (the head's raw outputs for every token: ALL pooling, no
activation unless use_activation=True), embed (last token, normalized), encode (hidden states).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from distllm.layers.linear import ReplicatedLinear
from distllm.layers.pooler import Pooler, PoolingType, num_labels_of
from distllm.models.llama import DecoderModel, DecoderSpec, LlamaForCausalLM
from distllm.models.weights import load_named_weights


class LlamaForSequenceClassification(nn.Module):
    stacked_params = LlamaForCausalLM.stacked_params
    pooling_tasks = ("classify", "score", "reward", "embed", "encode")

    @staticmethod
    def spec_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.hf_config = hf_config
        self.spec = DecoderSpec.from_hf(hf_config, **self.spec_overrides(hf_config))
        self.model = DecoderModel(self.spec, dtype)
        self.num_labels = num_labels_of(hf_config)
        self.score = ReplicatedLinear(self.spec.hidden_size, self.num_labels, False, dtype)
        self.pooler = Pooler(
            self.pooling_tasks,
            embed_pooling=PoolingType.LAST,
            embed_normalize=True,
            classify_pooling=PoolingType.LAST,
            reward_pooling=PoolingType.ALL,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def pool(self, hidden: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return self.pooler(hidden, params, head=self.score)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        return load_named_weights(
            self, weights, self.stacked_params, skip_suffixes=("rotary_emb.inv_freq", "lm_head.weight")
        )


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    @staticmethod
    def spec_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
        return {"qkv_bias": True}


class Qwen3ForSequenceClassification(LlamaForSequenceClassification):
    @staticmethod
    def spec_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
        return {"qk_norm": True, "attention_bias": bool(hf_config.get("attention_bias", False))}


__all__ = ["LlamaForSequenceClassification", "Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification"]
