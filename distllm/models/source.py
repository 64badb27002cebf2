"""Where a model comes from: a local HF folder, a GGUF file, a hub id, or the embedded default.

Resolving reads only config.json (or the GGUF header); no weights, no tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from distllm.logger import init_logger
from distllm.models import registry

if TYPE_CHECKING:
    from distllm.config import EngineArgs, ModelConfig

logger = init_logger(__name__)


def _find_local(model: str, revision: str | None) -> str:
    if os.path.exists(model):
        return model
    if model.count("/") == 1 and not model.startswith((".", "/")):
        # A hub id: only what is already in the local HF cache (no downloads at run time).
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, revision=revision, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not available locally"
            raise FileNotFoundError(
                f"model {model!r} is neither a local path nor in the local Hugging Face cache ({e.__class__.__name__}). "
                "Pass a folder with config.json and *.safetensors, or a .gguf file."
            ) from None
    raise FileNotFoundError(f"model path {model!r} does not exist. Pass a folder with config.json, or a .gguf file.")


def _read_hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model folder {folder!r}; distllm needs a Hugging Face model folder.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.json in {folder!r} is not valid JSON: {e}") from None


def _pick_architecture(cfg: dict[str, Any], trust_remote_code: bool, where: str) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if registry.is_supported(a):
            return a
    if cfg.get("auto_map"):
        if not trust_remote_code:
            raise ValueError(
                f"the model at {where!r} ({archs or cfg.get('model_type')}) needs remote code from its repository "
                "(config.json has auto_map). Remote code is off by default: pass trust_remote_code=True only if you "
                "trust it, though distllm runs its own model implementations and supports only: "
                f"{', '.join(registry.supported_architectures())}."
            )
        raise NotImplementedError(
            f"the model at {where!r} needs custom remote code ({archs}); distllm does not execute model code from "
            f"repositories. Supported architectures: {', '.join(registry.supported_architectures())}."
        )
    raise ValueError(
        f"Model architecture {archs or cfg.get('model_type')!r} at {where!r} is not supported by distllm. "
        f"Supported: {', '.join(registry.supported_architectures())}."
    )


def _derive_max_len(cfg: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if cfg.get(key):
            return int(cfg[key])
    return 2048


def _resolve_dtype(requested: str, cfg: dict[str, Any], on_gpu: bool) -> str:
    from distllm.config import _canonical_dtype

    requested = _canonical_dtype(requested)
    if requested != "auto":
        return requested
    if not on_gpu:
        return "float32"  # CPU matmuls in half precision are slow and less exact
    cfg_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return "bfloat16" if cfg_dtype in ("float32", "bfloat16") else "float16"


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_source(args: "EngineArgs") -> "ModelConfig":
    from distllm.config import ModelConfig

    gguf_file = None
    if args.model is None:
        from distllm.models.gguf_loader import default_model_path

        model = default_model_path()
    else:
        model = _find_local(os.path.expanduser(args.model), args.revision)
    load_format = args.load_format
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a GGUF file or a model folder.")
        from distllm.models.gguf_loader import gguf_to_hf_config

        gguf_file = model
        cfg = gguf_to_hf_config(model)
        if load_format == "auto":
            load_format = "gguf"
    else:
        cfg = _read_hf_config(model)
        from distllm.layers.pooler import apply_sentence_transformers_config

        cfg = apply_sentence_transformers_config(cfg, model)
        if load_format == "auto":
            load_format = "safetensors"
        if load_format == "gguf":
            raise ValueError("load_format='gguf' needs a .gguf file as model.")
    if args.hf_overrides:
        cfg = {**cfg, **args.hf_overrides}
    arch = _pick_architecture(cfg, args.trust_remote_code, model)
    runner = args.runner
    if runner == "auto":
        runner = "pooling" if registry.is_pooling_architecture(arch) else "generate"

    derived = _derive_max_len(cfg)
    st_len = (cfg.get("sentence_transformers") or {}).get("max_seq_length")
    if st_len:
        derived = min(derived, int(st_len))
    if cfg.get("model_type") == "mistral" and cfg.get("sliding_window"):
        # Full attention equals sliding-window attention while sequences fit in the window.
        derived = min(derived, int(cfg["sliding_window"]))
    max_len = args.max_model_len or derived
    if max_len > derived:
        raise ValueError(
            f"max_model_len ({max_len}) is larger than the model's maximum length ({derived}, from its config)."
        )
    on_gpu = resolve_device(args.device) == "cuda"
    tokenizer = args.tokenizer or (gguf_file if gguf_file else model)
    return ModelConfig(
        model=model,
        tokenizer=tokenizer,
        hf_config=cfg,
        architecture=arch,
        dtype=_resolve_dtype(args.dtype, cfg, on_gpu),
        max_model_len=max_len,
        load_format=load_format,
        runner=runner,
        trust_remote_code=args.trust_remote_code,
        quantization=_resolve_quantization(args.quantization, load_format, on_gpu),
        gguf_file=gguf_file,
        revision=args.revision,
    )


def _resolve_quantization(requested: str | None, load_format: str, on_gpu: bool) -> str | None:
    """'gguf' (keep GGUF weights quantized) or None (dequantize at load / not quantized)."""
    if requested == "dequantize":
        return None
    if requested == "gguf":
        if load_format != "gguf":
            raise ValueError(f"quantization='gguf' needs a GGUF model file, got load_format={load_format!r}.")
        return "gguf"
    return "gguf" if load_format == "gguf" and on_gpu else None
