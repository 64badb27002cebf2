"""GGUF weights kept quantized in device memory.

* ``GGUFQuantizedTensor``: what the GGUF iterator yields for a quantized 2-D tensor when
  ``quantization='gguf'``: the raw block rows (uint8 [rows, row_bytes], on the host), the GGML
  type and the logical [rows, cols] shape. It slices like a loaded weight (``w[a:b]`` = rows,
  ``w[:, a:b]`` = columns, block-aligned only), so the linears' sharding code is unchanged, and
  ``dequantize()`` gives float32 for loaders that want floats.
* ``QuantizedWeight``: the quantized state of one linear layer. The layer's ``weight``
  parameter keeps its identity but its data becomes the uint8 rows ([out_per_rank, bytes]);
  ``matmul`` runs ``gguf_linear``. Stacked layers (QKV, gate/up) may get shards of different
  types (Q4_K_M files store v/down in Q6_K, q/k/gate/up in Q4_K): each shard is a row segment
  with its own type, the buffer is as wide as the widest segment's rows, and consecutive
  segments of one type are multiplied in one launch.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from distllm.ops.gguf_quant import LAYOUTS, GGMLType, dequantize_ref, ggml_type, gguf_linear


_DEFERRED_DEVICE: list[torch.device] = []  # set while a model is built for quantized loading


@contextmanager
def deferred_linear_weights(device: torch.device | str) -> Iterator[None]:
    """Build linear layers with their weights on the meta device; each gets memory on ``device``
    when its first shard is loaded (uint8 rows if quantized, else floats). Without this, a
    quantized load would first allocate every weight as floats: the dequantized size at peak."""
    _DEFERRED_DEVICE.append(torch.device(device))
    try:
        yield
    finally:
        _DEFERRED_DEVICE.pop()


def deferred_device() -> torch.device | None:
    return _DEFERRED_DEVICE[-1] if _DEFERRED_DEVICE else None


@dataclass
class GGUFQuantizedTensor:
    data: torch.Tensor  # uint8 [rows, cols / block_size * type_size]: the file's bytes
    qtype: GGMLType
    shape: tuple[int, int]  # logical (rows, cols), torch order

    def __post_init__(self) -> None:
        self.qtype = ggml_type(self.qtype)
        lay = LAYOUTS[self.qtype]
        rows, cols = self.shape
        expect = (rows, cols // lay.block_size * lay.type_size)
        if cols % lay.block_size or tuple(self.data.shape) != expect or self.data.dtype != torch.uint8:
            raise ValueError(
                f"{self.qtype.name} tensor of shape {self.shape} needs uint8 data {expect}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}."
            )

    @property
    def block_size(self) -> int:
        return LAYOUTS[self.qtype].block_size

    def get_shape(self) -> tuple[int, int]:
        return self.shape

    def __getitem__(self, idx) -> "GGUFQuantizedTensor":
        """Row slice ``w[a:b]`` or column slice ``w[:, a:b]`` (columns: whole blocks only)."""
        if isinstance(idx, slice):
            rows = range(self.shape[0])[idx]
            if rows.step != 1:
                raise ValueError("quantized tensors slice rows with step 1 only")
            return GGUFQuantizedTensor(self.data[idx], self.qtype, (len(rows), self.shape[1]))
        if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], slice):
            cols = range(self.shape[1])[idx[1]]
            bs, ts = self.block_size, LAYOUTS[self.qtype].type_size
            if cols.step != 1 or cols.start % bs or len(cols) % bs:
                raise ValueError(
                    f"cannot split a {self.qtype.name} weight of {self.shape[1]} input features at columns "
                    f"[{cols.start}, {cols.stop}): the split must fall on {bs}-value block boundaries. "
                    "Use another tensor_parallel_size or quantization='dequantize'."
                )
            data = self.data[:, cols.start // bs * ts : cols.stop // bs * ts]  # [rows, len/bs * ts]
            return GGUFQuantizedTensor(data, self.qtype, (self.shape[0], len(cols)))
        raise TypeError(f"unsupported index {idx!r} for a quantized tensor")

    def dequantize(self) -> torch.Tensor:
        return dequantize_ref(self.data, self.qtype)


@dataclass
class _Segment:
    start: int  # first output row
    rows: int
    qtype: GGMLType


@dataclass
class QuantizedWeight:
    out_features: int  # this rank's rows
    in_features: int  # this rank's logical input features
    device: torch.device  # where the rows live (the parameter may still be on the meta device)
    segments: dict[int, _Segment] = field(default_factory=dict)  # by start row
    _runs: list[tuple[int, int, GGMLType]] | None = None  # merged segments, built on first use

    def store(self, param: nn.Parameter, part: GGUFQuantizedTensor, row_offset: int) -> None:
        """Copy ``part``'s raw rows into rows [row_offset, +rows) of ``param`` (made uint8)."""
        rows, cols = part.shape
        if cols != self.in_features or row_offset + rows > self.out_features:
            raise ValueError(
                f"quantized shard {part.shape} at row {row_offset} does not fit a weight of "
                f"[{self.out_features}, {self.in_features}]."
            )
        nbytes = part.data.shape[1]
        if param.dtype != torch.uint8:
            # The float placeholder is dropped here; the parameter object (and its weight_loader) stays.
            param.data = torch.zeros((self.out_features, nbytes), dtype=torch.uint8, device=self.device)
        elif param.shape[1] < nbytes:  # a wider type arrived for another segment: widen the rows
            wider = torch.zeros((self.out_features, nbytes), dtype=torch.uint8, device=self.device)
            wider[:, : param.shape[1]] = param.data
            param.data = wider
        param.data[row_offset : row_offset + rows, :nbytes].copy_(part.data)
        self.segments[row_offset] = _Segment(row_offset, rows, part.qtype)
        self._runs = None

    def runs(self) -> list[tuple[int, int, GGMLType]]:
        """(start row, rows, type) of maximal same-type row ranges, checked to cover every row."""
        if self._runs is None:
            runs: list[tuple[int, int, GGMLType]] = []
            pos = 0
            for seg in sorted(self.segments.values(), key=lambda s: s.start):
                if seg.start != pos:
                    raise RuntimeError(f"quantized weight rows [{pos}, {seg.start}) were never loaded")
                if runs and runs[-1][2] == seg.qtype:
                    runs[-1] = (runs[-1][0], runs[-1][1] + seg.rows, seg.qtype)
                else:
                    runs.append((seg.start, seg.rows, seg.qtype))
                pos = seg.start + seg.rows
            if pos != self.out_features:
                raise RuntimeError(f"quantized weight rows [{pos}, {self.out_features}) were never loaded")
            self._runs = runs
        return self._runs

    def matmul(self, x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out] in x's dtype."""
        outs = []
        for start, rows, qtype in self.runs():
            nbytes = self.in_features // LAYOUTS[qtype].block_size * LAYOUTS[qtype].type_size
            w = param[start : start + rows, :nbytes]  # strided view: rows keep the buffer's stride
            outs.append(gguf_linear(x, w, qtype, rows))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def lookup(self, ids: torch.Tensor, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight, [*ids.shape, in] in dtype (an embedding lookup:
        only the gathered rows are dequantized). One quantization type for all rows."""
        from distllm.ops.gguf_quant import gguf_dequantize_rows

        runs = self.runs()
        if len(runs) != 1:
            raise NotImplementedError("a quantized embedding with rows of several GGUF types")
        qtype = runs[0][2]
        nbytes = self.in_features // LAYOUTS[qtype].block_size * LAYOUTS[qtype].type_size
        flat = ids.reshape(-1)
        rows = param.index_select(0, flat)[:, :nbytes]  # [T, nbytes] uint8
        out = gguf_dequantize_rows(rows, qtype, self.in_features, dtype)  # [T, in]
        return out.view(*ids.shape, self.in_features)

    @property
    def qtypes(self) -> list[str]:
        return [s.qtype.name for s in sorted(self.segments.values(), key=lambda s: s.start)]


@dataclass
class QuantizationSummary:
    """Which layers hold quantized weights, and their size against a float copy."""

    layers: list[str]
    by_type: Counter  # GGML type name -> number of row segments
    quantized_bytes: int  # the uint8 buffers
    dequantized_bytes: int  # the same weights as `dtype` floats

    def describe(self, dtype_name: str) -> str:
        ratio = self.dequantized_bytes / max(self.quantized_bytes, 1)
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.by_type.items()))
        return (
            f"{len(self.layers)} GGUF weights kept quantized ({types}): {self.quantized_bytes / 2**20:.1f} MiB "
            f"vs {self.dequantized_bytes / 2**20:.1f} MiB as {dtype_name} ({ratio:.2f}x smaller)"
        )


def quantization_summary(model: nn.Module, dtype: torch.dtype) -> QuantizationSummary:
    layers, by_type, qbytes, fbytes = [], Counter(), 0, 0
    elt = torch.empty((), dtype=dtype).element_size()
    for name, mod in model.named_modules():
        qw = getattr(mod, "qweight", None)
        if not isinstance(qw, QuantizedWeight):
            continue
        layers.append(name)
        by_type.update(qw.qtypes)
        qbytes += mod.weight.numel() * mod.weight.element_size()
        fbytes += qw.out_features * qw.in_features * elt
    return QuantizationSummary(layers, by_type, qbytes, fbytes)
