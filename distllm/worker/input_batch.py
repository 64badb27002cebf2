"""Per-request state a worker keeps across steps, and the host arrays built from it for one step.

Block tables live in one persistent host array (a row per live request, updated from the plan's
block diffs), so a step gathers its rows instead of rebuilding every table from Python lists.
The step's inputs stay numpy arrays until the runner decides where they go: straight into the
CUDA graph's static buffers for decode, or into fresh device tensors for an eager step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distllm.core.plan import StepPlan
from distllm.layers.attention import AttentionMetadata


# A token the worker sampled in a step still in flight; its input comes from the device.
PLACEHOLDER_TOKEN = -1


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + every output token the driver has accepted
    num_prompt_tokens: int
    num_computed_tokens: int
    sampling: Any = None  # distllm.layers.sampler.SamplingState for generation
    pooling: dict[str, Any] | None = None
    prompt_logprobs: int | None = None
    row: int = -1  # this request's row in the BlockTableHost (which holds its block ids)


class BlockTableHost:
    """Block tables of every live request: row r holds the block ids of the request given row r."""

    def __init__(self, max_blocks_per_seq: int, rows: int = 64):
        self.width = max_blocks_per_seq
        self.table = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int32)
        self._free = list(range(rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        if not self._free:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        n = int(self.num_blocks[row])
        if n + len(block_ids) > self.width:
            raise RuntimeError(f"a request holds {n + len(block_ids)} blocks; max_model_len allows {self.width}")
        self.table[row, n : n + len(block_ids)] = block_ids
        self.num_blocks[row] = n + len(block_ids)

    def remove(self, row: int) -> None:
        self._free.append(row)


@dataclass
class StepInputs:
    """One step's model inputs as host arrays, in batch order."""

    req_ids: list[str]
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    seq_lens: np.ndarray  # [B] int32: context length after this step
    query_start_loc: np.ndarray  # [B + 1] int32
    block_tables: np.ndarray  # [B, max blocks this step] int32
    max_query_len: int
    fresh_prefill_only: bool
    causal: bool
    # Rows of the hidden states whose logits are sampled, and the requests they belong to.
    sample_rows: list[int] = field(default_factory=list)
    sample_req_ids: list[str] = field(default_factory=list)
    # Prompt-logprob rows: (req_id, hidden rows, target token ids).
    prompt_lp: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    # Pooling requests whose prompt is complete this step: (req_id, first row, last row + 1).
    pool_spans: list[tuple[str, int, int]] = field(default_factory=list)
    # Input rows holding PLACEHOLDER_TOKEN, and their requests.
    placeholder_rows: list[int] = field(default_factory=list)
    placeholder_req_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=dev(self.slot_mapping),
            block_tables=dev(self.block_tables),
            seq_lens=dev(self.seq_lens),
            query_start_loc=dev(self.query_start_loc),
            max_query_len=self.max_query_len,
            max_seq_len=int(self.seq_lens.max()) if len(self.req_ids) else 0,
            fresh_prefill_only=self.fresh_prefill_only,
            causal=self.causal,
        )
        return dev(self.input_ids), dev(self.positions), meta


def build_step_inputs(
    plan: StepPlan, states: dict[str, CachedRequestState], tables: BlockTableHost, block_size: int, causal: bool
) -> StepInputs:
    scheduled = plan.num_scheduled_tokens
    req_ids = list(scheduled)
    B = len(req_ids)
    # Gathered in Python lists and turned into arrays once: the loop runs for every request of
    # every step, and storing numpy scalars one at a time costs more than the list appends.
    ids: list[int] = []
    starts: list[int] = []  # first position computed this step, per request
    table_rows: list[int] = []
    sample_rows: list[int] = []
    sample_req_ids: list[str] = []
    prompt_lp: list[tuple[str, list[int], list[int]]] = []
    pool_spans: list[tuple[str, int, int]] = []
    row = 0
    for rid, n in scheduled.items():
        st = states[rid]
        nc = st.num_computed_tokens
        end = nc + n
        toks = st.token_ids
        num_known = len(toks)
        if end > num_known:
            raise RuntimeError(f"plan schedules {end} tokens of {rid} but the worker knows {num_known}")
        # The step computes tokens nc..end-1 of the request: the worker's count moves on now, as
        # the scheduler's did when it made the plan (plans carry no counts for cached requests).
        st.num_computed_tokens = end
        if n == 1:
            ids.append(toks[nc])
        else:
            ids.extend(toks[nc:end])
        starts.append(nc)
        table_rows.append(st.row)
        if st.pooling is not None:
            if end == st.num_prompt_tokens:
                pool_spans.append((rid, row, row + n))
        elif end == num_known:
            sample_rows.append(row + n - 1)
            sample_req_ids.append(rid)
        if st.prompt_logprobs is not None:
            # Row for position p predicts prompt token p + 1.
            last = min(end, st.num_prompt_tokens - 1)
            if last > nc:
                prompt_lp.append((rid, list(range(row, row + last - nc)), toks[nc + 1 : last + 1]))
        row += n
    total = row
    counts = np.fromiter(scheduled.values(), dtype=np.int64, count=B)
    input_ids = np.array(ids, dtype=np.int64)
    start = np.array(starts, dtype=np.int64)
    rows = np.array(table_rows, dtype=np.int64)
    seq_lens = (start + counts).astype(np.int32)
    qsl = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(counts, out=qsl[1:])
    max_query_len = int(counts.max()) if B else 0
    if max_query_len == 1:
        positions = start
        row_of_token = np.arange(B)
    else:
        # positions: start[i] .. start[i] + counts[i] - 1 for each request, concatenated
        row_of_token = np.repeat(np.arange(B), counts)
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1].astype(np.int64) - start, counts)
    placeholder_rows: list[int] = []
    placeholder_req_ids: list[str] = []
    if (input_ids < 0).any():
        placeholder_rows = np.nonzero(input_ids < 0)[0].tolist()
        owner = np.searchsorted(qsl[1:], placeholder_rows, side="right")
        placeholder_req_ids = [req_ids[i] for i in owner.tolist()]
    width = max(1, int(tables.num_blocks[rows].max())) if B else 1
    block_tables = tables.table[rows, :width]
    # slot of position p = block_ids[p // block_size] * block_size + p % block_size
    slots = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return StepInputs(
        req_ids=req_ids,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        seq_lens=seq_lens,
        query_start_loc=qsl,
        block_tables=block_tables,
        max_query_len=max_query_len,
        fresh_prefill_only=bool((start == 0).all()),
        causal=causal,
        sample_rows=sample_rows,
        sample_req_ids=sample_req_ids,
        prompt_lp=prompt_lp,
        pool_spans=pool_spans,
        placeholder_rows=placeholder_rows,
        placeholder_req_ids=placeholder_req_ids,
    )
