"""Applies plan diffs to per-request state, runs the model, samples, and builds the StepResult."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distllm.config import EngineConfig
from distllm.core.plan import NewRequestData, RequestResult, StepPlan, StepResult, TokenLogprobs
from distllm.distributed.parallel_state import get_tp_rank, get_tp_size
from distllm.layers.attention import forward_context
from distllm.layers.sampler import Sampler, SamplingState, compute_token_logprobs
from distllm.logger import init_logger
from distllm.models.loader import load_model, torch_dtype
from distllm.worker.input_batch import PLACEHOLDER_TOKEN, BlockTableHost, CachedRequestState, build_step_inputs
from distllm.worker.kv_cache import KVCacheSpec, allocate_kv_cache, cpu_num_blocks

logger = init_logger(__name__)


@dataclass
class _PendingStep:
    """A launched step: its result is complete once the host copies (event) have landed."""

    result: StepResult
    per_req: dict[str, RequestResult] = field(default_factory=dict)
    sample_req_ids: list[str] = field(default_factory=list)
    sample_states: list = field(default_factory=list)
    sample_cached: list = field(default_factory=list)  # CachedRequestState per sampled row
    placeholder_at: list[int] = field(default_factory=list)  # index of its placeholder token
    host: list | None = None  # [sampled ids, logprob ids, logprobs, ranks] on the host (or None)
    event: "torch.cuda.Event | None" = None

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class PinnedRing:
    """A few pinned int64 buffers used in turn, for copies of at most ``size`` values per step.

    Four slots: a slot is reused three launches later, when at most two steps are in flight, so
    its previous copy has long finished (the caller has waited on that step).
    """

    SLOTS = 4

    def __init__(self, size: int, pin: bool):
        self.bufs = [torch.empty(size, dtype=torch.int64, pin_memory=pin) for _ in range(self.SLOTS)]
        self.turn = 0

    def _next(self, n: int) -> torch.Tensor:
        buf = self.bufs[self.turn]
        self.turn = (self.turn + 1) % self.SLOTS
        if n > buf.numel():
            raise ValueError(f"{n} values do not fit a pinned buffer of {buf.numel()}")
        return buf[:n]

    def copy_from(self, t: torch.Tensor) -> torch.Tensor:
        """Start a device-to-host copy of a 1-D int64 tensor; valid once the step's event is done."""
        if t.device.type == "cpu":
            return t
        h = self._next(t.numel())
        h.copy_(t, non_blocking=True)
        return h

    def to_device(self, rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
        """Host lists of ints -> device tensors, in one host-to-device copy."""
        if device.type == "cpu":
            return [torch.tensor(r, dtype=torch.int64) for r in rows]
        total = sum(len(r) for r in rows)
        h = self._next(total)
        hv = h.numpy()
        at = 0
        for r in rows:
            hv[at : at + len(r)] = r
            at += len(r)
        d = h.to(device, non_blocking=True)
        out, at = [], 0
        for r in rows:
            out.append(d[at : at + len(r)])
            at += len(r)
        return out


def _to_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Start device-to-host copies into pinned memory without waiting for them."""
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t)
        else:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            out.append(h)
    return out


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        self.model_config = config.model_config
        self.block_size = config.cache_config.block_size
        self.dtype = torch_dtype(self.model_config.dtype)
        self.states: dict[str, CachedRequestState] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.sampler = Sampler()
        self.model: torch.nn.Module | None = None
        self.is_driver_rank = get_tp_rank() == 0
        self.graphs = None  # DecodeGraphs once captured
        self.block_tables = BlockTableHost(
            -(-config.scheduler_config.max_model_len // self.block_size), rows=config.scheduler_config.max_num_seqs + 8
        )
        self.offload = None  # worker/offload.CpuOffloader when cpu_offload_gb is set
        # The last launched step's sampled ids (device) and their rows, per request.
        self._last_sampled: torch.Tensor | None = None
        self._last_sampled_rows: dict[str, int] = {}
        self.num_placeholder_fills = 0  # steps whose inputs came from a step still in flight
        # Pinned rings for the per-step small copies: allocating pinned memory while a step is
        # in flight can wait for the device, which would undo the overlap.
        pin = self.device.type == "cuda"
        self._host_ids = PinnedRing(config.scheduler_config.max_num_seqs, pin)
        self._host_fill = PinnedRing(2 * config.scheduler_config.max_num_seqs, pin)

    # ---- start-up ---------------------------------------------------------------------------

    def load_model(self) -> None:
        from distllm.worker.offload import make_offloader

        # cpu_offload_gb: decides which layers live in pinned host memory before any weight is on the GPU.
        self.offload = make_offloader(self.config, self.device, self.kv_cache_spec())
        self.model = load_model(self.model_config, self.device, seed=self.config.seed, place=self.offload)

    def kv_cache_spec(self) -> KVCacheSpec:
        mc = self.model_config
        tp = get_tp_size()
        kv_heads = max(1, mc.num_kv_heads // tp)
        return KVCacheSpec(mc.num_layers, self.block_size, kv_heads, mc.head_dim, self.dtype)

    def determine_num_blocks(self) -> int:
        cc = self.config.cache_config
        if cc.num_gpu_blocks_override:
            return cc.num_gpu_blocks_override
        spec = self.kv_cache_spec()
        sc = self.config.scheduler_config
        if self.device.type == "cpu":
            return cpu_num_blocks(spec, sc.max_num_seqs * sc.max_model_len, cc.kv_cache_memory_bytes)
        from distllm.worker.memory import profile_num_gpu_blocks

        return profile_num_gpu_blocks(self, spec)

    def init_kv_cache(self, num_blocks: int) -> None:
        t0 = time.perf_counter()
        spec = self.kv_cache_spec()
        self.kv_caches = allocate_kv_cache(spec, num_blocks, self.device)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GB) in %.2f s",
            num_blocks, self.block_size, num_blocks * spec.block_bytes / 1e9, time.perf_counter() - t0,
        )
        offloading = self.offload is not None and self.offload.active
        if offloading and not self.config.enforce_eager:
            from distllm.worker.offload import log_graphs_off

            log_graphs_off()
        if self.device.type == "cuda" and not self.config.enforce_eager and not offloading and hasattr(self.model, "compute_logits"):
            from distllm.worker.cuda_graph import DecodeGraphs

            sc = self.config.scheduler_config
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, sc.max_num_seqs, sc.max_model_len, self.block_size,
                self.model.spec.vocab_size, self.device, logits_dtype=self.dtype,
            )
            self.graphs.capture(also_precompile=self._first_prefills)
        if self.device.type == "cuda":
            self._settle_csrc_ops()

    def _settle_csrc_ops(self) -> None:
        """Last start-up phase: load the csrc sampling ops built in the background; with tensor
        parallelism every rank must take the same path, since each samples its own copy of
        the tokens that the next step reads."""
        from distllm.ops import csrc_ext

        have = csrc_ext.finish_build() is not None
        if get_tp_size() > 1:
            import torch.distributed as dist

            from distllm.distributed.parallel_state import get_tp_group

            flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=get_tp_group())
            if have and int(flag.item()) == 0:
                csrc_ext.disable("another tensor-parallel rank could not load it")

    @torch.inference_mode()
    def _first_prefills(self) -> None:
        """Fresh-prompt prefills with the KV cache and their greedy samples, as the first requests
        run them outside the graphs; run compile-only before capture (ops/launch.py), so that
        the first token does not wait for these kernels' compiles (~2 s on an H100 for the 8B
        shape). Two lengths: Triton specializes a token count divisible by 16 apart from others."""
        from distllm.layers.attention import AttentionMetadata
        from distllm.ops.dispatch import argmax

        sc = self.config.scheduler_config
        top = max(2, min(128, sc.max_num_batched_tokens, sc.max_model_len))
        dev = self.device
        for n in (top, top - 1):
            meta = AttentionMetadata(
                slot_mapping=torch.arange(n, dtype=torch.int64, device=dev),
                block_tables=torch.arange(-(-n // self.block_size), dtype=torch.int32, device=dev).view(1, -1),
                seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
                max_query_len=n,
                max_seq_len=n,
                fresh_prefill_only=True,
                causal=True,
            )
            with forward_context(meta, self.kv_caches):
                hidden = self.model(torch.zeros(n, dtype=torch.int64, device=dev), torch.arange(n, device=dev))
            argmax(self.model.compute_logits(hidden[-1:]))

    # ---- plan diffs ---------------------------------------------------------------------------

    def _add_request(self, r: NewRequestData) -> None:
        tokens = list(r.prompt_token_ids) + list(r.output_token_ids)
        sampling = None
        prompt_lp = None
        if r.sampling is not None:
            sampling = SamplingState.create(r.sampling, r.prompt_token_ids, list(r.output_token_ids), self.device)
            prompt_lp = r.sampling.get("prompt_logprobs")
        self.states[r.req_id] = CachedRequestState(
            req_id=r.req_id,
            token_ids=tokens,
            num_prompt_tokens=len(r.prompt_token_ids),
            num_computed_tokens=r.num_computed_tokens,
            sampling=sampling,
            pooling=r.pooling,
            prompt_logprobs=prompt_lp,
            row=self.block_tables.add(r.block_ids),
        )

    def _drop(self, rid: str) -> None:
        st = self.states.pop(rid, None)
        if st is not None:
            self.block_tables.remove(st.row)

    def apply_plan(self, plan: StepPlan) -> None:
        for rid in plan.finished_req_ids:
            self._drop(rid)
        for rid in plan.preempted_req_ids:
            self._drop(rid)
        for r in plan.new_requests:
            self._add_request(r)
        # A cached request's computed count is not in the plan: build_step_inputs advances it.
        cr = plan.cached_requests
        states = self.states
        for row, new in cr.new_tokens_by_row().items():
            st = states[cr.req_ids[row]]
            st.token_ids.extend(new)
            if st.sampling is not None:
                st.sampling.output_token_ids.extend(new)
        for row, new in cr.new_blocks_by_row().items():
            self.block_tables.append(states[cr.req_ids[row]].row, new)

    # ---- one step ---------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "_PendingStep":
        """Apply the plan and queue the step's GPU work; the host copies of the sampled ids are in
        flight when this returns, so the driver can process the previous step meanwhile."""
        self.apply_plan(plan)
        pending = _PendingStep(StepResult(step_id=plan.step_id))
        if plan.is_empty():
            return pending
        inputs = build_step_inputs(
            plan, self.states, self.block_tables, self.block_size, causal=getattr(self.model, "is_causal", True)
        )
        kwargs = {}
        if getattr(self.model, "accepts_token_type_ids", False):
            from distllm.models.bert import step_token_type_ids

            tt = step_token_type_ids(plan.num_scheduled_tokens, self.states, self.device)
            if tt is not None:
                kwargs["token_type_ids"] = tt
        use_graph = (
            self.graphs is not None
            and not kwargs
            and not inputs.pool_spans
            and self.graphs.can_run(len(inputs.req_ids), inputs.num_tokens)
        )
        fill = self._placeholder_fill(inputs)
        hidden = graph_logits = None
        if use_graph:
            graph_logits = self.graphs.run(inputs, fill)  # a decode step: every row is sampled, in order
        else:
            input_ids, positions, meta = inputs.to_device(self.device)
            if fill is not None:
                input_ids.index_copy_(0, *fill)
            with forward_context(meta, self.kv_caches):
                hidden = self.model(input_ids, positions, **kwargs)
        per_req = pending.per_req

        if inputs.sample_rows:
            if graph_logits is not None:
                logits = graph_logits
            else:
                if len(inputs.sample_rows) == hidden.shape[0]:
                    sampled_hidden = hidden
                else:
                    rows = torch.tensor(inputs.sample_rows).to(self.device, non_blocking=True)
                    sampled_hidden = hidden.index_select(0, rows)
                # In the model's dtype, as the graphs give them: the sampler widens what it
                # computes on (an exact conversion), and greedy rows need no float32 copy.
                logits = self.model.compute_logits(sampled_hidden)
            cached = [self.states[r] for r in inputs.sample_req_ids]
            states = [c.sampling for c in cached]
            out = self.sampler(logits, states)
            pending.sample_req_ids = inputs.sample_req_ids
            pending.sample_states = states
            # The worker keeps the tokens it samples: a placeholder now, the id once the step is
            # done. The next step may already read it: its input then comes from the device.
            pending.sample_cached = cached
            pending.placeholder_at = [len(c.token_ids) for c in cached]
            for c in cached:
                c.token_ids.append(PLACEHOLDER_TOKEN)
                if c.sampling is not None:
                    c.sampling.output_token_ids.append(PLACEHOLDER_TOKEN)
            self._last_sampled = out.sampled_token_ids
            self._last_sampled_rows = {rid: i for i, rid in enumerate(inputs.sample_req_ids)}
            extras = [out.logprob_token_ids, out.logprobs, out.sampled_ranks] if self.is_driver_rank else [None] * 3
            pending.host = [self._host_ids.copy_from(out.sampled_token_ids), *_to_host(extras)]
            if self.device.type == "cuda":
                pending.event = torch.cuda.Event()
                pending.event.record()

        for rid, rows, targets in inputs.prompt_lp:
            k = self.states[rid].prompt_logprobs
            logits = self.model.compute_logits(hidden[rows[0] : rows[-1] + 1]).float()
            ids, lps, ranks = compute_token_logprobs(logits, torch.tensor(targets, device=self.device), k)
            if self.is_driver_rank:
                per_req.setdefault(rid, RequestResult(rid)).prompt_logprobs = TokenLogprobs(
                    ids.tolist(), lps.tolist(), ranks.tolist()
                )

        if inputs.pool_spans:
            self._pool(hidden, inputs, per_req)
        return pending

    def _placeholder_fill(self, inputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, ids) that overwrite placeholder input tokens with the previous step's samples,
        still on the device (the step was launched before that one finished)."""
        if not inputs.placeholder_rows:
            return None
        self.num_placeholder_fills += 1
        rows_of = self._last_sampled_rows
        try:
            src = [rows_of[rid] for rid in inputs.placeholder_req_ids]
        except KeyError as e:
            raise RuntimeError(f"request {e} waits for a token that the previous step did not sample") from None
        dst_t, src_t = self._host_fill.to_device([inputs.placeholder_rows, src], self.device)
        return dst_t, self._last_sampled.index_select(0, src_t)

    def finish(self, pending: "_PendingStep") -> StepResult:
        """Wait for the step's sampled ids and build its StepResult (rank 0's is the one sent)."""
        per_req = pending.per_req
        if pending.host is not None:
            if pending.event is not None:
                pending.event.synchronize()
            ids_t, lp_ids_t, lps_t, ranks_t = pending.host
            ids = ids_t.tolist()
            for c, at, tok in zip(pending.sample_cached, pending.placeholder_at, ids):
                c.token_ids[at] = tok
                if c.sampling is not None:
                    c.sampling.output_token_ids[at - c.num_prompt_tokens] = tok
            lp_ids = lp_ids_t.tolist() if lp_ids_t is not None else None
            lps = lps_t.tolist() if lps_t is not None else None
            ranks = ranks_t.tolist() if ranks_t is not None else None
            pending.result.sampled_req_ids = pending.sample_req_ids
            pending.result.sampled_token_ids = ids
            if lp_ids is not None:
                for i, rid in enumerate(pending.sample_req_ids):
                    k = pending.sample_states[i].params.get("logprobs")
                    if k is not None:
                        rr = per_req.get(rid)
                        if rr is None:
                            rr = per_req[rid] = RequestResult(rid)
                        rr.logprobs = TokenLogprobs([lp_ids[i][: k + 1]], [lps[i][: k + 1]], [ranks[i]])
        pending.result.results = list(per_req.values())
        return pending.result

    def _pool(self, hidden: torch.Tensor, inputs, per_req: dict[str, RequestResult]) -> None:
        pool = getattr(self.model, "pool", None)
        for rid, start, end in inputs.pool_spans:
            st = self.states[rid]
            rr = per_req.setdefault(rid, RequestResult(rid))
            if pool is None:
                rr.error = f"model {self.model_config.architecture} has no pooler; use runner='generate'"
                continue
            data = pool(hidden[start:end], st.pooling or {})
            if self.is_driver_rank:
                flat = data.float().cpu()
                rr.pooled = flat.reshape(-1).tolist()
                rr.pooled_shape = list(flat.shape)
