"""Random but valid GGUF quantized blocks and small llama GGUF files, for tests and benchmarks
on machines that lack a real quantized model (the GPU hosts have no network).

Every bit pattern of the quant values and packed 6-bit sub-scales is a valid block, so blocks
are random bytes with the fp16 super-block scales set to finite values chosen so the weights
come out with roughly a given standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch

from distllm.ops.gguf_quant import LAYOUTS, GGMLType

# Typical |quant value x sub-scale| of random bytes per type (to size the fp16 scales).
_TYPICAL = {GGMLType.Q8_0: 74.0, GGMLType.Q4_0: 4.6, GGMLType.Q4_1: 8.8, GGMLType.Q4_K: 320.0, GGMLType.Q6_K: 1360.0}


def random_blocks(qtype: GGMLType, rows: int, cols: int, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    """Valid random GGUF rows uint8 [rows, cols / block_size * type_size] (CPU)."""
    lay = LAYOUTS[qtype]
    nb = cols // lay.block_size
    b = torch.randint(0, 256, (rows, nb, lay.type_size), dtype=torch.uint8, generator=gen)
    d = (torch.rand(rows, nb, 1, generator=gen) + 0.5) * (std / _TYPICAL[qtype])

    def f16(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float16).view(torch.uint8)  # [rows, nb, 2]

    if qtype == GGMLType.Q6_K:
        b[..., 208:210] = f16(d)  # Q6_K keeps d last
    else:
        b[..., 0:2] = f16(d)
    if qtype == GGMLType.Q4_1:
        b[..., 2:4] = f16(-7.5 * d)  # m: centre the weights on 0
    elif qtype == GGMLType.Q4_K:
        b[..., 2:4] = f16(7.5 * d)  # dmin: the same
    return b.reshape(rows, -1)


Q4_1_TYPES = {k: GGMLType.Q4_1 for k in ("q", "k", "v", "o", "gate", "up", "down")} | {"embd": GGMLType.Q8_0}
MIXED_TYPES = {"embd": GGMLType.Q8_0, "q": GGMLType.Q4_K, "k": GGMLType.Q4_K, "v": GGMLType.Q6_K,
               "o": GGMLType.Q8_0, "gate": GGMLType.Q4_0, "up": GGMLType.Q4_1, "down": GGMLType.Q6_K,
               "head": GGMLType.Q6_K}


def write_llama_gguf(path: str, *, hidden: int, ffn: int, heads: int, kv: int, layers: int, vocab: int,
                     types: dict[str, GGMLType], tied: bool, seed: int = 0) -> str:
    """A llama GGUF with random quantized weights (types by role: embd, q, k, v, o, gate, up,
    down, head) and F32 norms. Needs the ``gguf`` package."""
    import gguf

    gen = torch.Generator().manual_seed(seed)
    w = gguf.GGUFWriter(path, "llama")
    for key, val in {"block_count": layers, "context_length": 4096, "embedding_length": hidden,
                     "feed_forward_length": ffn, "attention.head_count": heads, "attention.head_count_kv": kv,
                     "rope.dimension_count": hidden // heads}.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)

    def add(name: str, role: str, rows: int, cols: int = 0) -> None:
        if role == "norm":
            w.add_tensor(name, (1.0 + 0.1 * torch.randn(rows, generator=gen)).numpy().astype(np.float32))
            return
        raw = random_blocks(types[role], rows, cols, gen, std=1.5 / cols**0.5)
        w.add_tensor(name, raw.numpy(), raw_dtype=gguf.GGMLQuantizationType(int(types[role])))

    hd = hidden // heads
    add("token_embd.weight", "embd", vocab, hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", "norm", hidden)
        add(f"blk.{i}.ffn_norm.weight", "norm", hidden)
        add(f"blk.{i}.attn_q.weight", "q", heads * hd, hidden)
        add(f"blk.{i}.attn_k.weight", "k", kv * hd, hidden)
        add(f"blk.{i}.attn_v.weight", "v", kv * hd, hidden)
        add(f"blk.{i}.attn_output.weight", "o", hidden, heads * hd)
        add(f"blk.{i}.ffn_gate.weight", "gate", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", "up", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", "down", hidden, ffn)
    add("output_norm.weight", "norm", hidden)
    if not tied:
        add("output.weight", "head", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
