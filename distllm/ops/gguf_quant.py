"""GGUF block-quantized weights: block layouts, a torch reference dequantizer, and ``gguf_linear``.

A quantized weight of logical shape [N, K] is kept as its raw GGUF bytes: a uint8 tensor
[N, K / block_size * type_size] (one row = the row's blocks back to back, exactly as in the
file). Supported types and their blocks (all scales little-endian fp16):

* Q8_0 (32 values, 34 bytes):  d | 32 x int8 q                       w = d * q
* Q4_0 (32 values, 18 bytes):  d | 16 bytes, value j in byte j % 16,
                               low nibble for j < 16, high for j >= 16  w = d * (q - 8)
* Q4_1 (32 values, 20 bytes):  d | m | 16 bytes as Q4_0                w = d * q + m
* Q4_K (256 values, 144 bytes): d | dmin | 12 bytes of 8 packed 6-bit (scale, min) pairs |
                               128 bytes: value j in byte 32 * (j // 64) + j % 32, nibble
                               (j // 32) % 2; sub-block s = j // 32   w = d*sc[s]*q - dmin*mn[s]
* Q6_K (256 values, 210 bytes): 128 bytes low nibbles | 64 bytes high 2 bits | 16 int8
                               scales (one per 16 values) | d        w = d * sc[j // 16] * (q - 32)

The formulas follow gguf-py's ``gguf.quants`` (numpy) bit for bit; tests check equality.

``gguf_linear(x, qweight, qtype, out_features)`` computes ``x @ dequant(W).T``: the Triton
kernels of ``triton_gguf_matmul`` on CUDA (or on CPU under TRITON_INTERPRET=1 with
DISTLLM_FORCE_TRITON=1), dequantize-then-``F.linear`` on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F

from distllm.ops.dispatch import use_triton


class GGMLType(IntEnum):
    """GGML tensor type ids (same numbers as ``gguf.GGMLQuantizationType``) kept quantized."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14


@dataclass(frozen=True)
class BlockLayout:
    block_size: int  # values per block
    type_size: int  # bytes per block


LAYOUTS: dict[GGMLType, BlockLayout] = {
    GGMLType.Q4_0: BlockLayout(32, 18),
    GGMLType.Q4_1: BlockLayout(32, 20),
    GGMLType.Q8_0: BlockLayout(32, 34),
    GGMLType.Q4_K: BlockLayout(256, 144),
    GGMLType.Q6_K: BlockLayout(256, 210),
}
SUPPORTED_QTYPES = tuple(t.name for t in GGMLType)


def ggml_type(qtype: int | str | GGMLType) -> GGMLType:
    """Normalise a type given as id, name or enum; ValueError for types without a kernel."""
    try:
        return GGMLType[qtype] if isinstance(qtype, str) else GGMLType(int(qtype))
    except (KeyError, ValueError):
        raise ValueError(
            f"GGML type {qtype!r} has no quantized kernel; supported: {', '.join(SUPPORTED_QTYPES)}."
        ) from None


def is_supported_qtype(qtype: int | str) -> bool:
    try:
        ggml_type(qtype)
        return True
    except ValueError:
        return False


def row_bytes(qtype: int | str | GGMLType, cols: int) -> int:
    """Bytes of one quantized row of ``cols`` values."""
    lay = LAYOUTS[ggml_type(qtype)]
    if cols % lay.block_size:
        raise ValueError(f"{ggml_type(qtype).name} rows need a multiple of {lay.block_size} values, got {cols}.")
    return cols // lay.block_size * lay.type_size


# ----------------------------------------------------------------------------- torch reference


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> [...] float32 (exact: fp16 -> fp32 is lossless)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., B] uint8 -> [..., 2, B] low then high nibbles (value j < B from the low nibble)."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:  # b: [R, nb, 34]
    d = _f16(b[..., 0:2])[..., None]
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return q * d


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:  # b: [R, nb, 18]
    d = _f16(b[..., 0:2])[..., None]
    q = _nibbles(b[..., 2:]).flatten(-2).to(torch.int8) - 8  # [R, nb, 32]
    return d * q.float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:  # b: [R, nb, 20]
    d = _f16(b[..., 0:2])[..., None]
    m = _f16(b[..., 2:4])[..., None]
    q = _nibbles(b[..., 4:]).flatten(-2).float()  # [R, nb, 32]
    return d * q + m


def q4_k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes [..., 12] -> 6-bit (scale, min) [..., 8] each, as ints."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc, mn


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:  # b: [R, nb, 144]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = q4_k_scale_min(b[..., 4:16])
    dsc = (d * sc.float())[..., None]  # [R, nb, 8, 1]
    dmn = (dmin * mn.float())[..., None]
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 32)  # [R, nb, 4 groups of 64 values, 32 bytes]
    q = _nibbles(qs).reshape(*b.shape[:-1], 8, 32).float()  # sub-block s = 2 * group + nibble
    return (dsc * q - dmn).flatten(-2)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:  # b: [R, nb, 210]
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 64)  # two halves of 128 values
    qh = b[..., 128:192].reshape(*lead, 2, 32)
    scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [R, nb, 16]
    d = _f16(b[..., 208:210])[..., None]
    low = _nibbles(ql).reshape(*lead, 2, 4, 32)  # value 128 h + 32 i + l: nibble (i // 2) of byte 64 h + 32 (i % 2) + l
    high = torch.stack([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-2)  # [R, nb, 2, 4, 32]
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(*lead, 16, 16).float()
    return ((d * scales)[..., None] * q).flatten(-2)


_DEQUANT = {
    GGMLType.Q8_0: _deq_q8_0,
    GGMLType.Q4_0: _deq_q4_0,
    GGMLType.Q4_1: _deq_q4_1,
    GGMLType.Q4_K: _deq_q4_k,
    GGMLType.Q6_K: _deq_q6_k,
}


def dequantize_ref(qweight: torch.Tensor, qtype: int | str | GGMLType) -> torch.Tensor:
    """Raw GGUF rows uint8 [N, nb * type_size] -> float32 [N, nb * block_size] (torch ops only)."""
    t = ggml_type(qtype)
    lay = LAYOUTS[t]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] % lay.type_size:
        raise ValueError(
            f"{t.name} weight must be uint8 [rows, k * {lay.type_size}], got {qweight.dtype} {tuple(qweight.shape)}."
        )
    n, nbytes = qweight.shape
    blocks = qweight.reshape(n, nbytes // lay.type_size, lay.type_size)  # [N, nb, type_size]
    return _DEQUANT[t](blocks).reshape(n, -1)  # [N, K]


def gguf_dequantize_rows(rows: torch.Tensor, qtype: int | str | GGMLType, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Raw GGUF rows uint8 [N, nb * type_size] -> [N, k] in dtype (Triton on CUDA): an embedding
    lookup of a quantized table dequantizes only the rows it gathered."""
    t = ggml_type(qtype)
    if use_triton(rows):
        from distllm.ops.triton_gguf_matmul import gguf_dequantize

        return gguf_dequantize(rows, t, k, dtype)
    return dequantize_ref(rows, t).to(dtype)


# ----------------------------------------------------------------------------- matmul


def gguf_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int | str | GGMLType, out_features: int
) -> torch.Tensor:
    """``x @ dequant(W).T`` for x [..., K] and W's raw rows [N, K / bs * ts] (uint8; rows may be a
    strided view with a row stride larger than the row's bytes). Output [..., N] in x's dtype."""
    t = ggml_type(qtype)
    if qweight.shape[0] != out_features:
        raise ValueError(f"quantized weight has {qweight.shape[0]} rows, expected {out_features}.")
    if use_triton(qweight):
        from distllm.ops.triton_gguf_matmul import gguf_matmul

        k = x.shape[-1]
        y = gguf_matmul(x.reshape(-1, k), qweight, t)  # [M, N]
        return y.reshape(*x.shape[:-1], out_features)
    w = dequantize_ref(qweight, t)
    return F.linear(x, w.to(x.dtype))
