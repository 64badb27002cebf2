"""Tensor-parallel linear layers. Each parameter carries its own `weight_loader`, so loading a
shard is reading a slice of the checkpoint tensor (a safetensors slice reads only those bytes).

A "loaded weight" is anything with a shape and slicing: a torch.Tensor, a safetensors slice, or
a `GGUFQuantizedTensor` (raw GGUF block rows). A layer whose weight arrives quantized keeps it
quantized (`QuantizedWeight`: the weight parameter's data becomes the uint8 rows) and multiplies
with `gguf_linear`; its biases stay float.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from distllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from distllm.layers.quantized import GGUFQuantizedTensor, QuantizedWeight, deferred_device
from distllm.ops import dispatch


def loaded_shape(w: Any) -> tuple[int, ...]:
    return tuple(w.get_shape()) if hasattr(w, "get_shape") else tuple(w.shape)


def materialize(w: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, GGUFQuantizedTensor):  # a float parameter wants it: dequantize
        return w.dequantize().to(dtype)
    t = w if isinstance(w, torch.Tensor) else w[:]
    return t.to(dtype)


def _narrow(w: Any, dim: int, start: int, size: int) -> Any:
    """Slice a loaded weight along dim 0 or 1 without reading the rest."""
    if dim == 0:
        return w[start : start + size]
    return w[:, start : start + size]


def set_weight_loader(param: nn.Parameter, loader: Callable[..., None]) -> None:
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded: Any) -> None:
    shape = loaded_shape(loaded)
    if tuple(param.shape) != shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {shape}")
    param.data.copy_(materialize(loaded, param.dtype))


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b}).")
    return a // b


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        # Quantized GGUF loads build the weight on the meta device; it gets memory when loaded.
        self._device = deferred_device()
        meta = {"device": "meta"} if self._device is not None else {}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, **meta), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        # Kept outside the parameter registry (a plain attribute): loaders may still pass it in.
        object.__setattr__(self, "_placeholder", self.weight if self._device is not None else None)
        self.qweight: QuantizedWeight | None = None  # set when the weight is loaded GGUF-quantized
        self._float_weight_loaded = False

    def _allocate_weight(self, data: torch.Tensor) -> nn.Parameter:
        """Swap the meta placeholder for a parameter with memory (same weight_loader)."""
        new = nn.Parameter(data, requires_grad=False)
        set_weight_loader(new, self._placeholder.weight_loader)
        self.weight = new
        return new

    def _load_rows(self, param: nn.Parameter, part: Any, offset: int, rows: int) -> None:
        """Copy `rows` loaded rows into param rows [offset, offset + rows): raw bytes when the
        weight comes quantized (and no float shard of it came first), else as floats."""
        if loaded_shape(part)[0] != rows:
            raise ValueError(f"shape mismatch: expected {rows} rows from the checkpoint, got {loaded_shape(part)}")
        if param is self._placeholder:  # callers hold the placeholder; it may have been swapped already
            param = self.weight
        if param is self.weight and isinstance(part, GGUFQuantizedTensor) and not self._float_weight_loaded:
            out_rows, in_features = param.shape
            if self.qweight is None:
                self.qweight = QuantizedWeight(out_rows, in_features, self._device or param.device)
            if param.is_meta:
                param = self._allocate_weight(
                    torch.zeros((out_rows, part.data.shape[1]), dtype=torch.uint8, device=self._device)
                )
            self.qweight.store(param, part, offset)
            return
        if param is self.weight:
            if self.qweight is not None:
                raise ValueError(
                    f"a float shard arrived for a weight already stored GGUF-quantized ({self.qweight.qtypes}); "
                    "load this model with quantization='dequantize'."
                )
            self._float_weight_loaded = True
            if param.is_meta:
                param = self._allocate_weight(torch.empty(param.shape, dtype=param.dtype, device=self._device))
        param.data[offset : offset + rows].copy_(materialize(part, param.dtype))

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """x @ W.T (+ bias); ``gated``: x is [gate | up] and silu(gate) * up is multiplied."""
        if self.qweight is None:
            if gated:
                return dispatch.silu_and_mul_linear(x, self.weight, bias)
            return dispatch.linear(x, self.weight, bias)
        if gated:
            x = dispatch.silu_and_mul(x)
        y = self.qweight.matmul(x, self.weight)
        return y if bias is None else y + bias


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, dtype)
        set_weight_loader(self.weight, self.weight_loader)
        if self.bias is not None:
            set_weight_loader(self.bias, default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        shape = loaded_shape(loaded)
        if tuple(param.shape) != shape and self.qweight is None:
            raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {shape}")
        self._load_rows(param, loaded, 0, param.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays sharded (no communication)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        gather_output: bool = False,
    ):
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.out_per_rank = divide(out_features, self.tp_size, "output features")
        super().__init__(in_features, self.out_per_rank, bias, dtype)
        self.gather_output = gather_output
        set_weight_loader(self.weight, self.weight_loader)
        if self.bias is not None:
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        n = param.shape[0]
        self._load_rows(param, _narrow(loaded, 0, self.tp_rank * n, n), 0, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x, self.bias)
        return tp_all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate and up): shard i of each goes to rank i."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear needs the shard index of the loaded weight")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load_rows(param, _narrow(loaded, 0, self.tp_rank * size, size), offset, size)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a [gate, up] pair in one decode GEMV (ops/dispatch.gate_up_silu);
        None where it does not apply (prefill rows, quantized weights, CPU): the caller then
        runs forward() and applies the activation itself."""
        if self.qweight is not None or len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            return None
        return dispatch.gate_up_silu(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections stacked; KV heads are split across ranks, or replicated when
    tp_size > num_kv_heads (each rank then holds the one KV head its query heads use)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if tp >= num_kv_heads:
            if tp % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads ({num_kv_heads}) "
                    "when it is larger."
                )
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp, "num_key_value_heads"), 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str | None = None) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q, self.tp_rank * q
        elif shard_id in ("k", "v"):
            offset = q if shard_id == "k" else q + kv
            size, start = kv, (self.tp_rank // self.kv_replicas) * kv
        else:
            raise ValueError(f"QKVParallelLinear shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        self._load_rows(param, _narrow(loaded, 0, start, size), offset, size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ):
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.in_per_rank = divide(in_features, self.tp_size, "input features")
        super().__init__(self.in_per_rank, out_features, bias, dtype)
        self.reduce_results = reduce_results
        set_weight_loader(self.weight, self.weight_loader)
        if self.bias is not None:
            set_weight_loader(self.bias, default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        n = self.in_per_rank  # not param.shape[1]: a quantized weight's columns are bytes
        self._load_rows(param, _narrow(loaded, 1, self.tp_rank * n, n), 0, param.shape[0])

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """``gated``: x is a gated MLP's [gate | up]; SiLU-and-mul is applied first (fused into
        the decode GEMV where it takes this layer)."""
        y = self._linear(x, None, gated)
        if self.reduce_results:
            y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
