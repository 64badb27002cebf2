"""Sizing and allocating this rank's shard of the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CPU_DEFAULT_KV_BYTES = 512 << 20


@dataclass
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int  # per rank
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def cpu_num_blocks(spec: KVCacheSpec, max_tokens_wanted: int, memory_bytes: int | None) -> int:
    budget = memory_bytes or _CPU_DEFAULT_KV_BYTES
    by_memory = budget // spec.block_bytes
    # No point in holding more than every sequence at full length needs.
    by_need = -(-max_tokens_wanted // spec.block_size) + 1
    return max(1, min(by_memory, by_need) if memory_bytes is None else by_memory)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    # Zeros, not empty: masked-out slots still meet the value matmul (0 * NaN would poison it).
    return [
        (torch.zeros(shape, dtype=spec.dtype, device=device), torch.zeros(shape, dtype=spec.dtype, device=device))
        for _ in range(spec.num_layers)
    ]
