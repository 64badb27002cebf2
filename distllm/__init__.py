"""distllm: a distributed LLM inference engine with vLLM's API.

Importing distllm is light: heavy modules (torch models, tokenizers, engines) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "distllm.entrypoints.llm",
    "LLMEngine": "distllm.engine.llm_engine",
    "AsyncLLMEngine": "distllm.engine.async_llm_engine",
    "EngineArgs": "distllm.config",
    "AsyncEngineArgs": "distllm.config",
    "SamplingParams": "distllm.params",
    "BeamSearchParams": "distllm.params",
    "PoolingParams": "distllm.params",
    "RequestOutputKind": "distllm.params",
    "RequestOutput": "distllm.outputs",
    "CompletionOutput": "distllm.outputs",
    "Logprob": "distllm.outputs",
    "PoolingOutput": "distllm.outputs",
    "PoolingRequestOutput": "distllm.outputs",
    "EmbeddingOutput": "distllm.outputs",
    "EmbeddingRequestOutput": "distllm.outputs",
    "ClassificationOutput": "distllm.outputs",
    "ClassificationRequestOutput": "distllm.outputs",
    "ScoringOutput": "distllm.outputs",
    "ScoringRequestOutput": "distllm.outputs",
    "BeamSearchOutput": "distllm.outputs",
    "EngineDeadError": "distllm.executor.base",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
