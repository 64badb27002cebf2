"""Per-request state a worker keeps across steps, and the tensors built from it for one step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distllm.core.plan import StepPlan
from distllm.layers.attention import AttentionMetadata


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + every output token the driver has accepted
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: Any = None  # distllm.layers.sampler.SamplingState for generation
    pooling: dict[str, Any] | None = None
    prompt_logprobs: int | None = None


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    req_ids: list[str]  # batch order
    # Rows of the hidden states whose logits are sampled, and the requests they belong to.
    sample_rows: list[int] = field(default_factory=list)
    sample_req_ids: list[str] = field(default_factory=list)
    # Prompt-logprob rows: (req_id, hidden rows, target token ids, first prompt position).
    prompt_lp: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    # Pooling requests whose prompt is complete this step: (req_id, first row, last row + 1).
    pool_spans: list[tuple[str, int, int]] = field(default_factory=list)


def build_step_inputs(
    plan: StepPlan, states: dict[str, CachedRequestState], block_size: int, device: torch.device, causal: bool
) -> StepInputs:
    req_ids = list(plan.num_scheduled_tokens.keys())
    counts = list(plan.num_scheduled_tokens.values())
    total = sum(counts)
    input_ids = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    seq_lens = np.empty(len(req_ids), dtype=np.int32)
    qsl = np.zeros(len(req_ids) + 1, dtype=np.int32)
    max_blocks = max((len(states[r].block_ids) for r in req_ids), default=1) or 1
    block_tables = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
    out = StepInputs(None, None, None, req_ids)  # type: ignore[arg-type]
    fresh = True
    row = 0
    for i, (rid, n) in enumerate(zip(req_ids, counts)):
        st = states[rid]
        nc = st.num_computed_tokens
        end = nc + n
        if end > len(st.token_ids):
            raise RuntimeError(f"plan schedules {end} tokens of {rid} but the worker knows {len(st.token_ids)}")
        fresh &= nc == 0
        input_ids[row : row + n] = st.token_ids[nc:end]
        positions[row : row + n] = np.arange(nc, end)
        seq_lens[i] = end
        qsl[i + 1] = qsl[i] + n
        block_tables[i, : len(st.block_ids)] = st.block_ids
        if st.pooling is not None:
            if end == st.num_prompt_tokens:
                out.pool_spans.append((rid, row, row + n))
        elif end == len(st.token_ids):
            out.sample_rows.append(row + n - 1)
            out.sample_req_ids.append(rid)
        if st.prompt_logprobs is not None:
            # Row for position p predicts prompt token p + 1.
            last = min(end, st.num_prompt_tokens - 1)
            if last > nc:
                out.prompt_lp.append((rid, list(range(row, row + last - nc)), st.token_ids[nc + 1 : last + 1]))
        row += n
    bt = torch.from_numpy(block_tables)
    # slot of position p = block_ids[p // block_size] * block_size + p % block_size
    pos_t = torch.from_numpy(positions)
    row_of_token = torch.repeat_interleave(torch.arange(len(req_ids)), torch.tensor(counts, dtype=torch.int64))
    slots = bt[row_of_token, pos_t // block_size].long() * block_size + pos_t % block_size
    out.input_ids = torch.from_numpy(input_ids).to(device, non_blocking=True)
    out.positions = pos_t.to(device, non_blocking=True)
    out.meta = AttentionMetadata(
        slot_mapping=slots.to(device, non_blocking=True),
        block_tables=bt.to(device, non_blocking=True),
        seq_lens=torch.from_numpy(seq_lens).to(device, non_blocking=True),
        query_start_loc=torch.from_numpy(qsl).to(device, non_blocking=True),
        max_query_len=max(counts, default=0),
        max_seq_len=int(seq_lens.max()) if len(req_ids) else 0,
        fresh_prefill_only=fresh,
        causal=causal,
    )
    return out
