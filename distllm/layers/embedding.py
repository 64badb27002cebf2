"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary.

GGUF-quantized weights (quantization="gguf") stay quantized in both: each rank keeps its
vocabulary slice's raw block rows (padding rows are zero blocks); the embedding dequantizes
only the rows it looks up, the LM head computes logits with ``gguf_linear``, and a tied LM head
shares the embedding's quantized rows (SmolLM2's Q8_0 table: 28.7 MiB instead of 54 MiB as
bf16).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from distllm.layers.linear import loaded_shape, materialize, set_weight_loader
from distllm.layers.quantized import GGUFQuantizedTensor, QuantizedWeight
from distllm.ops import dispatch


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.vocab_size = vocab_size
        # Pad so every rank holds the same number of rows (padding rows are zero, never looked up).
        self.per_rank = (vocab_size + self.tp_size - 1) // self.tp_size
        self.start = self.tp_rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size, dtype=dtype), requires_grad=False)
        self.dtype = self.weight.dtype  # the activations' dtype, whatever the weight becomes
        self.qweight: QuantizedWeight | None = None  # set when GGUF rows are kept quantized
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        rows, cols = loaded_shape(loaded)
        if rows < self.vocab_size or cols != param.shape[1]:
            raise ValueError(
                f"{type(self).__name__} shape mismatch: checkpoint {(rows, cols)}, model vocab {self.vocab_size}"
            )
        n = self.end - self.start
        if isinstance(loaded, GGUFQuantizedTensor):
            self.qweight = QuantizedWeight(self.per_rank, cols, param.device)
            self.qweight.store(param, loaded[self.start : self.end], 0)
            if n < self.per_rank:  # zero padding rows: all-zero blocks dequantize to 0
                self.qweight.store(param, _zero_rows(loaded, self.per_rank - n), n)
            return
        param.data[:n].copy_(materialize(loaded[self.start : self.end], param.dtype))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.lookup(ids, self.weight, self.dtype)
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """ids [...] -> [..., hidden]. Under TP each rank looks up its vocabulary slice (zeros for
        the other ranks' ids) and the ranks' rows are summed; reduce=False returns this rank's
        part unsummed, for a caller that sums it in a fused kernel (the first RMSNorm)."""
        if self.tp_size == 1:
            return self._lookup(ids)
        lookup = self._lookup if self.qweight is not None else None
        out = dispatch.masked_embedding(ids, self.weight, self.start, self.end, lookup)
        return tp_all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered so every rank sees the full row."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__(vocab_size, hidden_size, dtype)
        self.__dict__["_tied"] = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        # Before loading: the embedding may still turn its rows into quantized ones, so its
        # qweight is looked up at each call.
        self.weight = embedding.weight
        self.__dict__["_tied"] = embedding  # a reference, not a submodule (no second registration)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        qweight = self._tied.qweight if self._tied is not None else self.qweight
        if qweight is not None:
            logits = qweight.matmul(hidden, self.weight)  # [N, per_rank]
        else:
            logits = dispatch.linear(hidden, self.weight)  # [N, per_rank]
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)  # [N, per_rank * tp]
        return logits[..., : self.vocab_size]


def _zero_rows(like: GGUFQuantizedTensor, rows: int) -> GGUFQuantizedTensor:
    data = torch.zeros((rows, like.data.shape[1]), dtype=torch.uint8)
    return GGUFQuantizedTensor(data, like.qtype, (rows, like.shape[1]))
