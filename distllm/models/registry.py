"""HF architecture name -> distllm model class (imported lazily, so `import distllm` stays light)."""

from __future__ import annotations

import importlib

from torch import nn

# architecture: (module under distllm.models, class name)
_GENERATE = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen", "Qwen3ForCausalLM"),
}
_POOLING: dict[str, tuple[str, str]] = {
    "BertModel": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "LlamaForSequenceClassification": ("seq_cls", "LlamaForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("seq_cls", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": ("seq_cls", "Qwen3ForSequenceClassification"),
}


def register_model(arch: str, module: str, cls: str, pooling: bool = False) -> None:
    (_POOLING if pooling else _GENERATE)[arch] = (module, cls)


def supported_architectures() -> list[str]:
    return sorted({**_GENERATE, **_POOLING})


def is_supported(arch: str) -> bool:
    return arch in _GENERATE or arch in _POOLING


def is_pooling_architecture(arch: str) -> bool:
    return arch in _POOLING


def get_model_class(arch: str) -> type[nn.Module]:
    entry = _GENERATE.get(arch) or _POOLING.get(arch)
    if entry is None:
        raise ValueError(
            f"Model architecture {arch!r} is not supported by distllm. Supported: {', '.join(supported_architectures())}."
        )
    module = importlib.import_module(f"distllm.models.{entry[0]}")
    return getattr(module, entry[1])
