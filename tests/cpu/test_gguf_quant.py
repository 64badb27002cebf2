"""GGUF weights kept quantized: reference dequantizer vs gguf-py, Triton dequantize-matmul under
the interpreter, the layers' quantized loading (sharding, stacking, mixed types), and whole
models (SmolLM2 Q4_1, a tiny mixed-type llama with TP=2) against dequantize-at-load."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import numpy as np
import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

import distllm.ops.triton_gguf_matmul as _tgm
from distllm.distributed import parallel_state
from distllm.layers.quantized import GGUFQuantizedTensor, quantization_summary
from distllm.ops.gguf_quant import LAYOUTS, GGMLType, dequantize_ref, gguf_linear

ALL_TYPES = list(GGMLType)


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    """Another module (tests/gpu/conftest.py) may have switched the kernels to compiled mode."""
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(_tgm._gemv_kernel, InterpretedFunction):
        importlib.reload(_tgm)
    yield


def random_blocks(qtype: GGMLType, rows: int, n_blocks: int, rng: np.random.Generator,
                  scale: float = 0.02) -> np.ndarray:
    """Valid random GGUF rows uint8 [rows, n_blocks * type_size].

    Q8_0/Q4_0/Q4_1: gguf-py's own quantizer on random floats. K-quants (gguf-py cannot quantize
    them): random bytes everywhere (every bit pattern of quants and packed 6-bit scales is valid)
    except the fp16 super-block scales, which get random finite values (std ``scale``)."""
    lay = LAYOUTS[qtype]
    if qtype in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1):
        x = rng.standard_normal((rows, n_blocks * lay.block_size)).astype(np.float32)
        return quants.quantize(x, QT(int(qtype)))
    b = rng.integers(0, 256, (rows, n_blocks, lay.type_size), dtype=np.uint8)

    def f16(scale):
        return (rng.standard_normal((rows, n_blocks, 1)) * scale).astype(np.float16).view(np.uint8)

    if qtype == GGMLType.Q4_K:
        b[..., 0:2], b[..., 2:4] = f16(scale), f16(scale)  # d, dmin
    else:
        b[..., 208:210] = f16(scale)  # d (Q6_K keeps it last)
    return b.reshape(rows, -1)


# --------------------------------------------------------------------------- reference dequantizer


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_reference_dequantizer_equals_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, rows=7, n_blocks=3, rng=rng)
    ref = quants.dequantize(raw, QT(int(qtype)))
    got = dequantize_ref(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape
    assert np.array_equal(got.numpy(), ref), np.abs(got.numpy() - ref).max()


def test_reference_dequantizer_all_zero_blocks_and_bad_input():
    for t in ALL_TYPES:  # zero padding rows (LM head) must decode to zeros
        z = torch.zeros((2, LAYOUTS[t].type_size), dtype=torch.uint8)
        assert torch.equal(dequantize_ref(z, t), torch.zeros(2, LAYOUTS[t].block_size))
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize_ref(torch.zeros((2, 100), dtype=torch.uint8), "Q4_K")
    with pytest.raises(ValueError, match="no quantized kernel"):
        dequantize_ref(torch.zeros((2, 32), dtype=torch.uint8), "Q5_0")


# --------------------------------------------------------------------------- Triton kernels


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
# M <= 4: GEMV kernel; above: the tensor-core kernel up to `mma` rows, else dequantize + matmul
@pytest.mark.parametrize("m,mma", [(1, 0), (3, 0), (8, 0), (20, 0), (9, 64), (20, 64)])
@pytest.mark.parametrize("n,n_blocks", [(8, 1), (13, 2), (24, 3)])
def test_triton_kernel_matches_dequant_matmul(qtype, m, mma, n, n_blocks, monkeypatch):
    monkeypatch.setattr(_tgm, "GEMV_MAX_M", 4)
    monkeypatch.setattr(_tgm, "MMA_MAX_M", mma)
    rng = np.random.default_rng(100 * int(qtype) + m + n)
    raw = torch.from_numpy(random_blocks(qtype, n, n_blocks, rng))
    w = dequantize_ref(raw, qtype)  # [N, K]
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
    y = _tgm.gguf_matmul(x, raw, qtype)
    ref = x.double() @ w.double().T
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert _rel_err(y, ref.float()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 17])  # GEMV kernel, dequantize + matmul
def test_triton_kernel_half_inputs_and_strided_rows(dtype, m):
    """Half inputs come back in their dtype; a row view narrower than its buffer (stacked layers
    with mixed types) is read with the buffer's row stride."""
    rng = np.random.default_rng(7)
    raw = torch.from_numpy(random_blocks(GGMLType.Q4_1, 16, 2, rng))  # [16, 40]
    wide = torch.zeros((16, 64), dtype=torch.uint8)
    wide[:, :40] = raw
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _tgm.gguf_matmul(x, wide[:, :40], GGMLType.Q4_1)
    ref = x.float() @ dequantize_ref(raw, GGMLType.Q4_1).T
    assert y.dtype == dtype and _rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_triton_dequantize_kernel_exact(qtype):
    rng = np.random.default_rng(int(qtype) + 50)
    raw = torch.from_numpy(random_blocks(qtype, 37, 2, rng))  # 37 rows: a partial row tile
    k = 2 * LAYOUTS[qtype].block_size
    assert torch.equal(_tgm.gguf_dequantize(raw, qtype, k, torch.float32), dequantize_ref(raw, qtype))
    half = _tgm.gguf_dequantize(raw, qtype, k, torch.bfloat16)
    ref = dequantize_ref(raw, qtype)
    # within one bf16 ulp (the interpreter's bf16 cast truncates where CUDA rounds to nearest)
    assert half.dtype == torch.bfloat16 and ((half.float() - ref).abs() <= ref.abs() * 2**-7).all()


def test_triton_kernel_shape_errors():
    raw = torch.zeros((4, 36), dtype=torch.uint8)  # 2 Q4_0 blocks = 64 values per row
    with pytest.raises(ValueError, match="K=32"):
        _tgm.gguf_matmul(torch.zeros(1, 32), raw, "Q4_0")


def test_gguf_linear_dispatch(monkeypatch):
    """CPU tensors: the torch reference; DISTLLM_FORCE_TRITON=1: the (interpreted) kernel. Same result."""
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(random_blocks(GGMLType.Q8_0, 12, 2, rng))
    x = torch.randn(2, 3, 64)  # leading dims are flattened and restored
    monkeypatch.delenv("DISTLLM_FORCE_TRITON", raising=False)
    ref = gguf_linear(x, raw, "Q8_0", 12)
    calls = []
    real = _tgm.gguf_matmul
    monkeypatch.setattr(_tgm, "gguf_matmul", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    got = gguf_linear(x, raw, "Q8_0", 12)
    assert calls and got.shape == (2, 3, 12)
    assert _rel_err(got, ref) < 1e-5
    assert torch.allclose(ref, x @ dequantize_ref(raw, "Q8_0").T)


# --------------------------------------------------------------------------- quantized tensors and layers


def _qt(qtype: GGMLType, rows: int, cols: int, seed: int = 0) -> GGUFQuantizedTensor:
    raw = random_blocks(qtype, rows, cols // LAYOUTS[qtype].block_size, np.random.default_rng(seed))
    return GGUFQuantizedTensor(torch.from_numpy(raw), qtype, (rows, cols))


def test_quantized_tensor_slicing():
    t = _qt(GGMLType.Q4_0, 6, 128)
    full = t.dequantize()
    assert torch.equal(t[2:5].dequantize(), full[2:5])
    assert torch.equal(t[:, 32:96].dequantize(), full[:, 32:96])
    assert t[:, 32:96].get_shape() == (6, 64)
    with pytest.raises(ValueError, match="block boundaries"):
        t[:, 16:48]
    with pytest.raises(ValueError, match="needs uint8 data"):
        GGUFQuantizedTensor(t.data[:, :10], GGMLType.Q4_0, (6, 128))


@pytest.fixture
def tp_state():
    """Pretend to be one rank of a TP group while building layers (no collectives are run)."""
    saved = (parallel_state._TP.rank, parallel_state._TP.size)

    def set_state(rank: int, size: int) -> None:
        parallel_state._TP.rank, parallel_state._TP.size = rank, size

    yield set_state
    parallel_state._TP.rank, parallel_state._TP.size = saved


def test_linears_load_quantized_and_match_float(tp_state):
    from distllm.layers.linear import (
        ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
    )

    tp_state(0, 1)
    x = torch.randn(3, 256)
    w = _qt(GGMLType.Q4_K, 48, 256, seed=1)
    for cls in (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear):
        layer = cls(256, 48, bias=False, dtype=torch.float32)
        layer.weight.weight_loader(layer.weight, w)
        assert layer.qweight is not None and layer.weight.dtype == torch.uint8
        assert torch.allclose(layer(x), x @ w.dequantize().T, atol=1e-4, rtol=1e-4), cls.__name__

    # QKV with mixed types (Q4_K_M stores v in Q6_K): three row segments, two runs
    qkv = QKVParallelLinear(256, 16, 2, 1, bias=True, dtype=torch.float32)
    q, k, v = _qt(GGMLType.Q4_K, 32, 256, 2), _qt(GGMLType.Q4_K, 16, 256, 3), _qt(GGMLType.Q6_K, 16, 256, 4)
    for shard, t in (("k", k), ("v", v), ("q", q)):  # file order is not row order
        qkv.weight.weight_loader(qkv.weight, t, shard)
    bias = torch.randn(64)
    for shard, sl in (("q", slice(0, 32)), ("k", slice(32, 48)), ("v", slice(48, 64))):
        qkv.bias.weight_loader(qkv.bias, bias[sl], shard)
    assert qkv.qweight.qtypes == ["Q4_K", "Q4_K", "Q6_K"]
    assert [(s, r, t.name) for s, r, t in qkv.qweight.runs()] == [(0, 48, "Q4_K"), (48, 16, "Q6_K")]
    assert qkv.weight.shape == (64, 210)  # as wide as the widest (Q6_K) rows
    ref = x @ torch.cat([q.dequantize(), k.dequantize(), v.dequantize()]).T + bias
    assert torch.allclose(qkv(x), ref, atol=1e-3, rtol=1e-4)

    merged = MergedColumnParallelLinear(256, [8, 8], dtype=torch.float32)
    g, u = _qt(GGMLType.Q8_0, 8, 256, 5), _qt(GGMLType.Q8_0, 8, 256, 6)
    merged.weight.weight_loader(merged.weight, g, 0)
    merged.weight.weight_loader(merged.weight, u, 1)
    assert len(merged.qweight.runs()) == 1  # one type: one launch
    ref = x @ torch.cat([g.dequantize(), u.dequantize()]).T
    assert torch.allclose(merged(x), ref, atol=1e-4, rtol=1e-4)


def test_linears_mixed_float_and_quantized_shards(tp_state):
    from distllm.layers.linear import MergedColumnParallelLinear

    tp_state(0, 1)
    g = _qt(GGMLType.Q8_0, 8, 64, 5)
    # float first: the later quantized shard is dequantized into the float weight
    layer = MergedColumnParallelLinear(64, [8, 8], dtype=torch.float32)
    up = torch.randn(8, 64)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight.weight_loader(layer.weight, g, 0)
    assert layer.qweight is None and torch.equal(layer.weight[:8], g.dequantize())
    # quantized first: a float shard cannot join it
    layer = MergedColumnParallelLinear(64, [8, 8], dtype=torch.float32)
    layer.weight.weight_loader(layer.weight, g, 0)
    with pytest.raises(ValueError, match="quantization='dequantize'"):
        layer.weight.weight_loader(layer.weight, up, 1)
    # a shard that was never loaded is reported at the first forward
    with pytest.raises(RuntimeError, match=r"rows \[8, 16\) were never loaded"):
        layer(torch.randn(1, 64))


def test_row_parallel_shards_sum_to_full(tp_state):
    """TP=2 row-parallel: each rank keeps its column blocks; partial products sum to the full one."""
    from distllm.layers.linear import RowParallelLinear

    w = _qt(GGMLType.Q4_1, 16, 128, 9)
    x = torch.randn(2, 128)
    parts = []
    for rank in range(2):
        tp_state(rank, 2)
        layer = RowParallelLinear(128, 16, dtype=torch.float32, reduce_results=False)
        layer.weight.weight_loader(layer.weight, w)
        assert layer.weight.shape == (16, 2 * 20)  # 64 values per rank = 2 Q4_1 blocks
        parts.append(layer(x[:, 64 * rank : 64 * (rank + 1)]))
    assert torch.allclose(parts[0] + parts[1], x @ w.dequantize().T, atol=1e-4, rtol=1e-4)


def test_row_parallel_split_inside_a_block_is_a_clear_error(tp_state):
    from distllm.layers.linear import RowParallelLinear
    from distllm.models.weights import load_named_weights

    tp_state(1, 2)
    layer = RowParallelLinear(256, 8, dtype=torch.float32)  # 128 input features per rank
    with pytest.raises(ValueError, match=r"'o\.weight'.*Q6_K weight of 256 input features at columns \[128, 256\)"):
        load_named_weights(torch.nn.ModuleDict({"o": layer}), [("o.weight", _qt(GGMLType.Q6_K, 8, 256))])


def test_lm_head_quantized_with_vocab_padding(tp_state):
    from distllm.layers.embedding import ParallelLMHead

    w = _qt(GGMLType.Q8_0, 5, 64, 11)  # vocab 5 over 2 ranks: 3 rows each, rank 1 has a padding row
    h = torch.randn(2, 64)
    logits = []
    for rank in range(2):
        tp_state(rank, 2)
        head = ParallelLMHead(5, 64, torch.float32)
        head.weight.weight_loader(head.weight, w)
        assert head.weight.dtype == torch.uint8 and head.weight.shape == (3, 68)
        logits.append(head.qweight.matmul(h, head.weight))
    full = torch.cat(logits, dim=-1)[:, :5]
    assert torch.allclose(full, h @ w.dequantize().T, atol=1e-4, rtol=1e-4)
    assert torch.equal(logits[1][:, 2], torch.zeros(2))  # the padding row


# --------------------------------------------------------------------------- config


def test_quantization_option_resolution():
    from distllm.config import EngineArgs
    from distllm.models.source import _resolve_quantization

    assert _resolve_quantization(None, "gguf", on_gpu=True) == "gguf"
    assert _resolve_quantization(None, "gguf", on_gpu=False) is None
    assert _resolve_quantization("gguf", "gguf", on_gpu=False) == "gguf"
    assert _resolve_quantization("dequantize", "gguf", on_gpu=True) is None
    assert _resolve_quantization(None, "safetensors", on_gpu=True) is None
    with pytest.raises(ValueError, match="needs a GGUF model file"):
        _resolve_quantization("gguf", "safetensors", on_gpu=True)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineArgs(quantization="awq")


# --------------------------------------------------------------------------- SmolLM2 Q4_1 end to end

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_smollm2_gguf_tensors_quantized_equal_dequantized(smol_gguf):
    from distllm.models.gguf_loader import iter_gguf_tensors

    floats = dict(iter_gguf_tensors(smol_gguf, torch.float32))
    for name, t in iter_gguf_tensors(smol_gguf, torch.float32, keep_quantized=True):
        if isinstance(t, GGUFQuantizedTensor):
            if name == "model.embed_tokens.weight":
                assert t.qtype == GGMLType.Q8_0
            else:
                assert ".layers." in name and t.qtype == GGMLType.Q4_1
            # q/k rows un-permuted as raw block rows decode to the un-permuted float rows
            assert torch.equal(t.dequantize(), floats[name]), name
        else:
            assert t.dim() == 1, name  # F32 norms
            assert torch.equal(t, floats[name]), name


@pytest.fixture(scope="module")
def smol_outputs():
    """Greedy tokens and quantization summaries, quantized ('gguf') and dequantized (CPU default)."""
    from distllm import LLM, SamplingParams

    out = {}
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for quant in ("gguf", None):
        llm = LLM(device="cpu", max_model_len=256, kv_cache_memory_bytes=32 << 20, quantization=quant)
        try:
            model = llm.llm_engine.executor.worker.runner.model
            summary = quantization_summary(model, torch.bfloat16)
            tokens = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            out[quant] = (llm.llm_engine.model_config.quantization, summary, tokens)
        finally:
            llm.shutdown()
    return out


def test_smollm2_quantized_same_greedy_tokens(smol_outputs):
    mode_q, summary_q, tokens_q = smol_outputs["gguf"]
    mode_f, summary_f, tokens_f = smol_outputs[None]
    assert mode_q == "gguf" and mode_f is None  # CPU default: dequantize at load
    assert summary_f.layers == []
    assert tokens_q == tokens_f


def test_smollm2_quantized_memory(smol_outputs):
    _, s, _ = smol_outputs["gguf"]
    assert len(s.layers) == 30 * 4 + 1  # qkv, o, gate_up, down per layer, the embedding (head tied)
    assert dict(s.by_type) == {"Q4_1": 30 * 7, "Q8_0": 1}
    # Q4_1: 20 bytes per 32 values, Q8_0: 34, vs 64 (bf16): 63.3 + 28.7 MiB vs 256.4 MiB = 2.79x.
    # (Every weight matrix of the file kept as it is stored: nothing smaller is possible.)
    assert s.dequantized_bytes / s.quantized_bytes >= 2.75, s.describe("bfloat16")
    print(s.describe("bfloat16"))


# --------------------------------------------------------------------------- tiny mixed-type llama, TP=2


def _write_tiny_llama(path) -> str:
    """2-layer llama, hidden 256 (K-quant rows), every kernel type, untied quantized LM head."""
    rng = np.random.default_rng(0)
    hidden, heads, kv, ffn, vocab = 256, 4, 2, 512, 64
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": 2, "context_length": 256, "embedding_length": hidden, "feed_forward_length": ffn,
            "attention.head_count": heads, "attention.head_count_kv": kv, "rope.dimension_count": hidden // heads}
    for key, val in meta.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tiny-quant-llama")

    def add(name: str, qtype: GGMLType | None, rows: int, cols: int = 0) -> None:
        if qtype is None:  # norm
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(rows)).astype(np.float32))
        elif qtype in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1):
            x = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
            w.add_tensor(name, quants.quantize(x, QT(int(qtype))), raw_dtype=QT(int(qtype)))
        else:  # K-quants: valid random blocks, scaled down so activations stay tame
            raw = random_blocks(qtype, rows, cols // 256, rng, scale=1e-4)
            w.add_tensor(name, raw, raw_dtype=QT(int(qtype)))

    add("token_embd.weight", GGMLType.Q8_0, vocab, hidden)
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", None, hidden)
        add(f"blk.{i}.ffn_norm.weight", None, hidden)
        add(f"blk.{i}.attn_q.weight", GGMLType.Q4_K, hidden, hidden)
        add(f"blk.{i}.attn_k.weight", GGMLType.Q4_K, kv * 64, hidden)
        add(f"blk.{i}.attn_v.weight", GGMLType.Q6_K, kv * 64, hidden)
        add(f"blk.{i}.attn_output.weight", GGMLType.Q8_0, hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", GGMLType.Q4_0, ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", GGMLType.Q4_1, ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", GGMLType.Q6_K, hidden, ffn)
    add("output_norm.weight", None, hidden)
    add("output.weight", GGMLType.Q8_0, vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_quant_llama(tmp_path_factory):
    return _write_tiny_llama(tmp_path_factory.mktemp("gguf_quant") / "tiny-quant.gguf")


TINY_PROMPTS = [{"prompt_token_ids": [1, 5, 9, 13, 2]}, {"prompt_token_ids": [7, 7, 30, 41]}]


def _tiny_tokens(path: str, smol_gguf: str, tp: int, quant: str | None) -> tuple[list[list[int]], object]:
    from distllm import LLM, SamplingParams

    llm = LLM(model=path, tokenizer=smol_gguf, device="cpu", tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else None, max_model_len=128,
              kv_cache_memory_bytes=16 << 20, quantization=quant)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = llm.generate(TINY_PROMPTS, params, use_tqdm=False)
        model = llm.llm_engine.executor.worker.runner.model if tp == 1 else None
        return [list(o.outputs[0].token_ids) for o in outs], model
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny_reference(tiny_quant_llama, smol_gguf):
    return _tiny_tokens(tiny_quant_llama, smol_gguf, 1, "dequantize")[0]


def test_tiny_mixed_types_quantized_matches_dequantized(tiny_quant_llama, smol_gguf, tiny_reference):
    tokens, model = _tiny_tokens(tiny_quant_llama, smol_gguf, 1, "gguf")
    assert tokens == tiny_reference
    s = quantization_summary(model, torch.float32)
    assert "lm_head" in s.layers  # untied Q8_0 head kept quantized
    assert dict(s.by_type) == {"Q4_K": 4, "Q6_K": 4, "Q8_0": 4, "Q4_0": 2, "Q4_1": 2}
    assert model.model.layers[0].self_attn.qkv_proj.qweight.qtypes == ["Q4_K", "Q4_K", "Q6_K"]
    # The Q8_0 embedding stays quantized too; a lookup dequantizes only the rows it gathers.
    emb = model.model.embed_tokens
    assert emb.weight.dtype == torch.uint8 and emb.qweight.qtypes == ["Q8_0"]
    ids = torch.tensor([[3, 0], [31, 7]])
    got = emb(ids)
    assert got.shape == (2, 2, emb.qweight.in_features) and got.dtype == torch.float32
    from distllm.ops.gguf_quant import dequantize_ref

    table = dequantize_ref(emb.weight.data, "Q8_0")
    assert torch.equal(got, table[ids])


def test_tiny_mixed_types_tp2_matches_tp1(tiny_quant_llama, smol_gguf, tiny_reference):
    tokens, _ = _tiny_tokens(tiny_quant_llama, smol_gguf, 2, "gguf")
    assert tokens == tiny_reference


def test_tiny_mixed_types_triton_kernels_end_to_end(tiny_quant_llama, smol_gguf, tiny_reference, monkeypatch):
    """The whole model through the interpreted Triton kernels (what CUDA runs); short: the
    interpreter is slow."""
    from distllm import LLM, SamplingParams

    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    calls = []
    real = _tgm.gguf_matmul
    monkeypatch.setattr(_tgm, "gguf_matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    llm = LLM(model=tiny_quant_llama, tokenizer=smol_gguf, device="cpu", max_model_len=128,
              kv_cache_memory_bytes=16 << 20, quantization="gguf")
    try:
        out = llm.generate(TINY_PROMPTS, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                           use_tqdm=False)
    finally:
        llm.shutdown()
    assert [list(o.outputs[0].token_ids) for o in out] == [r[:2] for r in tiny_reference]
    assert 9 in calls and 2 in calls  # the 5 + 4 token prefill (dequantize + matmul), a 2-sequence decode (GEMV)


def test_deferred_linear_weights_allocate_on_load(tp_state):
    """Quantized loads build linears on the meta device: no float copy of the weights ever exists."""
    from distllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from distllm.layers.quantized import deferred_linear_weights

    tp_state(0, 1)
    with deferred_linear_weights("cpu"):
        quant = MergedColumnParallelLinear(64, [4, 4], bias=True, dtype=torch.float32)
        flt = RowParallelLinear(64, 8, dtype=torch.float32)
    assert quant.weight.is_meta and flt.weight.is_meta and not quant.bias.is_meta  # biases stay real
    placeholder = quant.weight
    g, u = _qt(GGMLType.Q4_0, 4, 64, 12), _qt(GGMLType.Q4_0, 4, 64, 13)
    placeholder.weight_loader(placeholder, g, 0)
    placeholder.weight_loader(placeholder, u, 1)  # the weight loading loop keeps passing the placeholder
    assert quant.weight is not placeholder and hasattr(quant.weight, "weight_loader")
    assert quant.weight.device.type == "cpu" and quant.weight.dtype == torch.uint8
    assert torch.equal(quant.weight, torch.cat([g.data, u.data]))
    dense = torch.randn(8, 64)
    flt.weight.weight_loader(flt.weight, dense)
    assert flt.weight.device.type == "cpu" and torch.equal(flt.weight, dense)


def test_synthetic_blocks_and_file(tmp_path):
    """The helpers the GPU tests and the benchmark use: finite weights of about the asked std,
    and a file the loader maps to a model with every layer quantized."""
    from distllm.models.gguf_loader import gguf_tensor_info, gguf_to_hf_config
    from distllm.ops.gguf_synthetic import MIXED_TYPES, random_blocks, write_llama_gguf

    gen = torch.Generator().manual_seed(0)
    for t in ALL_TYPES:
        w = dequantize_ref(random_blocks(t, 16, 512, gen, std=0.5), t)
        assert torch.isfinite(w).all() and 0.2 < w.std().item() < 1.0, (t.name, w.std().item())
    path = write_llama_gguf(str(tmp_path / "m.gguf"), hidden=256, ffn=512, heads=4, kv=2, layers=1, vocab=64,
                            types=MIXED_TYPES, tied=False)
    types = {i.gguf_name: i.quant_type for i in gguf_tensor_info(path)}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["output.weight"] == "Q6_K"
    assert gguf_to_hf_config(path)["tie_word_embeddings"] is False


def test_gemv_tile_fills_the_sms_on_small_matrices(monkeypatch):
    from distllm.ops import triton_gguf_matmul as T

    monkeypatch.setitem(T._SM_COUNTS, 0, 132)
    monkeypatch.setattr(T, "GEMV_MIN_WAVES", 1.0)
    cuda0 = torch.device("cuda", 0)
    bn, warps = T.GEMV_CONFIG[GGMLType.Q4_1]
    assert T.gemv_tile(GGMLType.Q4_1, 4096, 1, cuda0) == (bn, warps)  # 256 programs: as tuned
    small = T.gemv_tile(GGMLType.Q4_1, 576, 1, cuda0)
    assert small[0] < bn and -(-576 // small[0]) >= 132 and small[1] >= 1
    assert T.gemv_tile(GGMLType.Q4_1, 576, 64, cuda0) == (bn, warps)  # 64 rows fill the grid already
    assert T.gemv_tile(GGMLType.Q4_1, 576, 1, torch.device("cpu")) == (bn, warps)
    monkeypatch.setattr(T, "GEMV_MIN_WAVES", 0.0)
    assert T.gemv_tile(GGMLType.Q4_1, 576, 1, cuda0) == (bn, warps)


# --------------------------------------------------------------------------- word GEMV kernel


@pytest.fixture
def gemv_calls(monkeypatch):
    """Names of the GEMV kernels launched ('words' / 'bytes'), in order."""
    calls = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(_tgm, "_gemv_words_kernel", Spy("words", _tgm._gemv_words_kernel))
    monkeypatch.setattr(_tgm, "_gemv_kernel", Spy("bytes", _tgm._gemv_kernel))
    return calls


def _gemv_case(qtype, n, n_blocks, m, dtype=torch.float32, seed=0, row_stride=None, offset=0):
    """Random rows (optionally inside a wider buffer at a column offset), x and the fp64 reference."""
    gen = torch.Generator().manual_seed(seed)
    k = n_blocks * LAYOUTS[qtype].block_size
    raw = synth_blocks(qtype, n, k, gen)
    w = raw
    if row_stride is not None:
        buf = torch.randint(0, 256, (n, row_stride), dtype=torch.uint8, generator=gen)  # garbage around the rows
        buf[:, offset:offset + raw.shape[1]] = raw
        w = buf[:, offset:offset + raw.shape[1]]
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = x.double() @ dequantize_ref(raw, qtype).double().T
    return x, w, ref


from distllm.ops.gguf_synthetic import random_blocks as synth_blocks  # noqa: E402


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["words", "bytes"])
def test_gemv_kernels_match_dequant_matmul(qtype, m, kernel, monkeypatch, gemv_calls):
    """N = 13 rows with BLOCK_N = 4 (a partial row tile), 3 blocks per row (an odd count: a
    partial unit step for every type), through ``gguf_matmul`` with DISTLLM_GGUF_GEMV's setting."""
    monkeypatch.setattr(_tgm, "GEMV_MAX_M", 4)
    monkeypatch.setattr(_tgm, "GEMV_KERNEL", kernel)
    monkeypatch.setattr(_tgm, "GEMV_WORDS_CONFIG", {(qtype.name, 13, 3 * LAYOUTS[qtype].block_size, 1): (4, 4, 2)})
    x, w, ref = _gemv_case(qtype, 13, 3, m, seed=int(qtype) + 10 * m)
    y = _tgm.gguf_matmul(x, w, qtype)
    assert gemv_calls == [kernel]
    assert y.shape == (m, 13) and _rel_err(y, ref.float()) < 1e-4


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("legal", [True, False], ids=["word-aligned", "unaligned"])
def test_gemv_words_strided_rows_and_fallback(qtype, legal, gemv_calls):
    """Rows inside a wider buffer (mixed-type stacks). Word-aligned stride and offset: the word
    kernel reads them with the stride in words; a stride or offset that is not a multiple of the
    word size (int32 for Q4_1/Q4_K, int16 for the others): the byte kernel, same result."""
    nb = 1 if LAYOUTS[qtype].block_size == 256 else 3
    rb = nb * LAYOUTS[qtype].type_size
    if legal:
        stride, offset = rb + 8, 4
    else:  # stride 2 mod 4 breaks int32 words; an odd stride and offset break int16 words too
        stride, offset = (rb + 6, 0) if qtype in (GGMLType.Q4_1, GGMLType.Q4_K) else (rb + 3, 1)
    x, w, ref = _gemv_case(qtype, 6, nb, 2, dtype=torch.float16, seed=int(qtype), row_stride=stride, offset=offset)
    assert w.stride(0) == stride and (_tgm.gemv_words_view(w, qtype) is not None) == legal
    y = torch.empty(2, 6, dtype=torch.float16)
    assert _tgm.gguf_gemv(x, w, qtype, y, kernel="words", config=(4, 2, 1)) == ("words" if legal else "bytes")
    assert gemv_calls == ["words" if legal else "bytes"]
    assert _rel_err(y, ref.float()) < 1e-2


@pytest.mark.parametrize("qtype,n,k", [(GGMLType.Q4_1, 5, 576), (GGMLType.Q4_1, 3, 1536), (GGMLType.Q8_0, 5, 576)],
                         ids=["Q4_1-576", "Q4_1-1536", "Q8_0-576"])
def test_gemv_words_smollm2_shapes(qtype, n, k, gemv_calls):
    """SmolLM2-135M's K (576: 18 blocks, one padded step of 32 units; 1536: 48 blocks, two steps)
    with the default tile chooser, fp16 x, M = 1 and 2."""
    for m in (1, 2):
        x, w, ref = _gemv_case(qtype, n, k // 32, m, dtype=torch.float16, seed=k + m)
        y = _tgm.gguf_matmul(x, w, qtype)
        assert y.dtype == torch.float16 and _rel_err(y, ref.float()) < 1e-2
    assert gemv_calls == ["words", "words"]


def test_gemv_words_config_chooser(monkeypatch):
    T = _tgm
    for (name, n, k, m), (bn, units, warps) in T.GEMV_WORDS_CONFIG.items():  # the measured table
        assert name in GGMLType.__members__ and n > 0 and k > 0 and m >= 1
        assert bn & (bn - 1) == 0 and units & (units - 1) == 0 and warps in (1, 2, 4, 8, 16)
    monkeypatch.setattr(T, "GEMV_WORDS_CONFIG", {})  # the heuristic for every other shape
    monkeypatch.setitem(T._SM_COUNTS, 0, 132)
    cuda0 = torch.device("cuda", 0)
    for t, n, k in [(GGMLType.Q4_1, 576, 576), (GGMLType.Q4_1, 960, 576), (GGMLType.Q4_1, 3072, 576),
                    (GGMLType.Q4_1, 576, 1536), (GGMLType.Q8_0, 49152, 576), (GGMLType.Q4_K, 4096, 4096),
                    (GGMLType.Q6_K, 4096, 14336)]:
        for m in (1, 2):
            bn, units, warps = T.gemv_words_config(t, n, k, m, cuda0)
            uv = T._WORDS[t][4]
            assert bn & (bn - 1) == 0 and units & (units - 1) == 0 and warps in (1, 2, 4, 8)
            assert bn == 1 or -(-n // bn) * m >= 2 * 132  # >= 2 programs per SM where the rows allow
            assert bn * units * uv <= T._WORDS_TILE_VALUES
    assert T.gemv_words_config(GGMLType.Q4_1, 576, 576, 1, cuda0)[1] == 32  # the whole row in one step
    monkeypatch.setattr(T, "GEMV_WORDS_CONFIG", {("Q4_1", 576, 576, 1): (8, 16, 2)})
    assert T.gemv_words_config(GGMLType.Q4_1, 576, 576, 1, cuda0) == (8, 16, 2)
    assert T.gemv_words_config(GGMLType.Q4_1, 576, 576, 2, cuda0) == (8, 16, 2)  # falls back to M = 1's entry


def test_gemv_env_switch_selects_kernel(monkeypatch):
    """DISTLLM_GGUF_GEMV is read at import: 'bytes' runs the byte kernel, 'words' (default) the
    word kernel, anything else is an error."""
    x, w, ref = _gemv_case(GGMLType.Q4_0, 4, 1, 1, seed=3)
    try:
        for env, want in ((None, "words"), ("bytes", "bytes"), ("words", "words")):
            if env is None:
                monkeypatch.delenv("DISTLLM_GGUF_GEMV", raising=False)
            else:
                monkeypatch.setenv("DISTLLM_GGUF_GEMV", env)
            importlib.reload(_tgm)
            assert _tgm.GEMV_KERNEL == want
            y = torch.empty(1, 4)
            assert _tgm.gguf_gemv(x, w, GGMLType.Q4_0, y, config=(4, 1, 1)) == want
            assert _rel_err(y, ref.float()) < 1e-4
        monkeypatch.setenv("DISTLLM_GGUF_GEMV", "nibbles")
        with pytest.raises(ValueError, match="DISTLLM_GGUF_GEMV"):
            importlib.reload(_tgm)
    finally:
        monkeypatch.delenv("DISTLLM_GGUF_GEMV", raising=False)
        importlib.reload(_tgm)
