"""`distllm plan` / worker.memory_plan: weight counts equal the real models' parameters (tp=1
loaded, tp>1 built under a fake TP rank), KV arithmetic, largest max_model_len, CPU offload."""

from __future__ import annotations

import contextlib

import pytest
import torch

from distllm.config import EngineArgs
from distllm.distributed.parallel_state import _TP
from distllm.entrypoints import plan_cli
from distllm.models.registry import get_model_class
from distllm.worker.kv_cache import KVCacheSpec
from distllm.worker.memory_plan import (
    GiB,
    DecoderShape,
    buffer_bytes,
    count_weights,
    fmt_bytes,
    largest_max_model_len,
    offload_needed_gb,
    plan_memory,
    with_max_model_len,
    with_offload,
)

KINDS = ("llama", "qwen2", "qwen3")

# SmolLM2-135M's shape (what the embedded GGUF's header says), for plans without files.
SMOL = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "tie_word_embeddings": True,
}


def _model_config(folder: str, dtype: str = "float32"):
    return EngineArgs(model=folder, dtype=dtype, device="cpu").create_engine_config().model_config


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields tied ones once


@contextlib.contextmanager
def fake_tp(rank: int, size: int):
    old = (_TP.rank, _TP.size)
    _TP.rank, _TP.size = rank, size
    try:
        yield
    finally:
        _TP.rank, _TP.size = old


def _build_rank(hf_config: dict, arch: str, tp: int, rank: int, dtype=torch.bfloat16) -> torch.nn.Module:
    """One rank's model as the parallel layers shape it (meta tensors: nothing allocated, no forward)."""
    with fake_tp(rank, tp), torch.device("meta"):
        return get_model_class(arch)(hf_config, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_loaded_model_tp1(tiny_models, kind):
    from distllm.models.loader import load_model

    mc = _model_config(tiny_models[kind])
    model = load_model(mc, "cpu")
    shape = DecoderShape.from_hf(mc.hf_config, mc.architecture)
    assert count_weights(shape, 1).total * 4 == _param_bytes(model)
    assert buffer_bytes(shape) == sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [2, 4])  # 4 > 2 KV heads: KV heads replicated
def test_weights_equal_rank_model_tp(tiny_models, kind, tp):
    mc = _model_config(tiny_models[kind])
    shape = DecoderShape.from_hf(mc.hf_config, mc.architecture)
    planned = count_weights(shape, tp).total * 2
    for rank in (0, tp - 1):
        assert planned == _param_bytes(_build_rank(mc.hf_config, mc.architecture, tp, rank))


def test_weights_tp2_analytic(tiny_models):
    """Independent hand count for the tiny Llama (V 49152, H 64, I 128, 2 layers, 4 heads, 2 KV heads, D 16)."""
    mc = _model_config(tiny_models["llama"])
    per_layer = (2 + 2 * 1) * 16 * 64 + 64 * (4 * 16 // 2) + 2 * 64 * 64 + 64 * 64 + 2 * 64
    expected = 2 * (49152 // 2) * 64 + 2 * per_layer + 64  # untied embedding and LM head
    assert count_weights(DecoderShape.from_hf(mc.hf_config, mc.architecture), 2).total == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_padding_and_biases(tiny_models, kind, tp):
    """A vocabulary not divisible by tp (padded shards) plus every bias switch on."""
    mc = _model_config(tiny_models[kind])
    cfg = {**mc.hf_config, "vocab_size": 1001, "attention_bias": True, "mlp_bias": True}
    shape = DecoderShape.from_hf(cfg, mc.architecture)
    w = count_weights(shape, tp)
    assert w.embed == -(-1001 // tp) * 64
    for rank in (0, tp - 1):
        assert w.total * 2 == _param_bytes(_build_rank(cfg, mc.architecture, tp, rank))


def test_bad_tp_is_rejected():
    with pytest.raises(ValueError, match="num_attention_heads"):
        count_weights(DecoderShape.from_hf(SMOL), 2)  # 9 heads
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        count_weights(DecoderShape.from_hf({**SMOL, "num_attention_heads": 12, "num_key_value_heads": 4}), 6)
    with pytest.raises(ValueError, match="supports the decoder"):
        DecoderShape.from_hf({**SMOL, "architectures": ["BertModel"]})


def _smol_plan(gib: float = 1.0, **kw):
    args = dict(tp=1, gpu_memory_bytes=int(gib * GiB), max_model_len=8192, model_max_len=8192)
    args.update(kw)
    return plan_memory(DecoderShape.from_hf(SMOL), "bfloat16", **args)


@pytest.mark.parametrize("tp", [1, 3])
@pytest.mark.parametrize("eager", [False, True])
def test_kv_arithmetic(tp, eager):
    p = _smol_plan(24, tp=tp, enforce_eager=eager)
    spec = KVCacheSpec(30, 16, max(1, 3 // tp), 64, torch.bfloat16)
    assert p.kv_block_bytes == spec.block_bytes
    rest = (p.weight_bytes + p.buffer_bytes + p.activation_bytes + p.cuda_graph_bytes + p.cuda_context_bytes)
    assert (p.cuda_graph_bytes == 0) == eager
    assert p.num_blocks == (int(24 * GiB * 0.9) - rest) // spec.block_bytes
    assert p.kv_tokens == p.num_blocks * 16
    assert p.weight_bytes == count_weights(p.shape, tp).total * 2


@pytest.mark.parametrize("gib", [1.0, 1.05, 1.1])
def test_largest_max_model_len_is_the_boundary(gib):
    p = _smol_plan(gib)
    best = largest_max_model_len(p)
    assert 0 < best < 8192  # a tight card: the boundary lies inside the model's range
    assert with_max_model_len(p, best).fits
    assert not with_max_model_len(p, best + 1).fits
    assert not with_max_model_len(p, best + p.block_size).fits
    # Consistent with the KV tokens: one sequence of `best` tokens fits in the blocks left at that length.
    q = with_max_model_len(p, best)
    assert -(-best // 16) <= q.num_blocks


def test_largest_max_model_len_capped_by_model():
    assert largest_max_model_len(_smol_plan(24)) == 8192
    assert largest_max_model_len(_smol_plan(0.5)) == 0  # the weights alone don't fit


def test_offload_frees_exactly_g():
    p0 = _smol_plan(1.0)
    g = 0.1
    p1 = with_offload(p0, g)
    assert p0.weights_on_gpu_bytes - p1.weights_on_gpu_bytes == int(g * GiB)
    assert p1.offload_staging_bytes == 2 * p0.weights.per_layer * 2
    assert p1.num_blocks == (p0.kv_budget_bytes + int(g * GiB) - p1.offload_staging_bytes) // p0.kv_block_bytes
    assert p1.num_blocks > p0.num_blocks
    assert largest_max_model_len(p1) >= largest_max_model_len(p0)
    direct = _smol_plan(1.0, cpu_offload_gb=g)
    assert (direct.num_blocks, direct.offloaded_bytes) == (p1.num_blocks, p1.offloaded_bytes)


def test_offload_capped_at_layer_weights():
    p0 = _smol_plan(1.0)
    p = with_offload(p0, 100.0)
    assert p.offloaded_bytes == p0.offloadable_bytes == 30 * p0.weights.per_layer * 2
    assert p.weights_on_gpu_bytes == (p0.weights.embed + p0.weights.final_norm) * 2  # tied LM head
    assert _smol_plan(1.0, cpu_offload_gb=100.0).notes  # says it is capped


def test_offload_needed():
    p = _smol_plan(1.0, max_model_len=8192)
    assert not p.fits
    g = offload_needed_gb(p)
    assert g is not None and g > 0
    assert with_offload(p, g).fits and not with_offload(p, g - 0.01).fits
    assert offload_needed_gb(_smol_plan(24)) == 0.0
    assert offload_needed_gb(_smol_plan(0.3)) is None


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights in any form fails the test."""
    import distllm.models.gguf_loader as gl
    import distllm.models.loader as ld

    def boom(*a, **k):
        raise AssertionError("distllm plan loaded weights")

    for mod, name in ((ld, "load_model"), (ld, "iter_safetensors"), (gl, "iter_gguf_tensors"),
                      (gl, "iter_gguf_raw_tensors")):
        monkeypatch.setattr(mod, name, boom)


def _run_cli(argv, capsys):
    from distllm.entrypoints.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_tiny_folder(tiny_models, capsys, no_weights):
    rc, out, err = _run_cli(["plan", tiny_models["qwen2"], "--gpu-memory-gb", "1", "--tp", "2"], capsys)
    assert rc == 0, err
    mc = _model_config(tiny_models["qwen2"], "bfloat16")
    p = plan_memory(DecoderShape.from_hf(mc.hf_config, mc.architecture), "bfloat16", tp=2, gpu_memory_bytes=GiB,
                    max_model_len=mc.max_model_len, model_max_len=mc.max_model_len)
    assert "Qwen2ForCausalLM" in out and "bfloat16, tp=2" in out
    assert f"KV cache blocks{' '}" in out and str(p.num_blocks) in out
    assert "largest max_model_len" in out and "CUDA graph pool" in out and "activation peak" in out


def test_cli_offload_column(tiny_models, capsys, no_weights):
    rc, out, err = _run_cli(["plan", tiny_models["llama"], "--gpu-memory-gb", "1", "--cpu-offload-gb", "0.001"], capsys)
    assert rc == 0, err
    assert "offload 0.001 GiB" in out and "offloaded to CPU" in out


def test_cli_default_model(capsys, no_weights):
    rc, out, err = _run_cli(["plan", "--gpu-memory-gb", "24", "--quantization", "dequantize"], capsys)
    assert rc == 0, err
    p = _smol_plan(24)
    assert "SmolLM2" in out and "bfloat16, tp=1" in out
    assert str(p.num_blocks) in out and "256.6 MiB" in out  # 134.5M parameters in bf16
    assert "GGUF:" in out and "Q4_1" in out and "counts them dequantized" in out


def test_cli_default_model_kept_quantized(capsys, no_weights):
    """On GPUs GGUF weights stay quantized: SmolLM2's 210 linear weights are Q4_1 (20 bytes per 32
    weights), its Q8_0 token embedding (tied LM head) 34 bytes per 32; norms are bf16."""
    from dataclasses import replace

    rc, out, err = _run_cli(["plan", "--gpu-memory-gb", "24"], capsys)
    assert rc == 0, err
    h, q, kv, inter, layers, vocab = 576, 576, 3 * 64, 1536, 30, 49152
    linear = h * q + 2 * h * kv + q * h + 3 * h * inter
    norms = layers * 2 * h + h
    weights = layers * linear // 32 * 20 + vocab * h // 32 * 34 + norms * 2
    p = replace(_smol_plan(24), weight_bytes=weights)
    assert "kept quantized" in out and fmt_bytes(weights) in out
    assert str(p.num_blocks) in out and str(p.num_blocks) != str(_smol_plan(24).num_blocks)


def test_cli_without_gpu_memory_and_no_gpu(capsys, monkeypatch, no_weights):
    monkeypatch.setattr(plan_cli, "detect_gpu_memory_bytes", lambda: None)
    rc, out, err = _run_cli(["plan"], capsys)
    assert rc == 2
    assert "no GPU" in err and "--gpu-memory-gb" in err


def test_detect_respects_hidden_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert plan_cli.detect_gpu_memory_bytes() is None


def test_cli_offload_auto(capsys, no_weights):
    rc, out, err = _run_cli(["plan", "--gpu-memory-gb", "1", "--quantization", "dequantize", "--cpu-offload-gb", "auto",
                             "--max-model-len", "8192"], capsys)
    assert rc == 0, err
    g = offload_needed_gb(_smol_plan(1.0, max_model_len=8192))
    assert g is not None and g > 0
    assert f"cpu_offload_gb=auto: {g:g} GiB" in out and "offloaded to CPU" in out
    rc, out, err = _run_cli(["plan", "--gpu-memory-gb", "24", "--cpu-offload-gb", "auto"], capsys)
    assert rc == 0, err
    assert "cpu_offload_gb=auto: 0 GiB" in out
    import argparse

    with pytest.raises((SystemExit, argparse.ArgumentError), match="cpu_offload_gb|2"):
        _run_cli(["plan", "--gpu-memory-gb", "1", "--cpu-offload-gb", "lots"], capsys)
