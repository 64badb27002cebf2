"""CPU offload of decoder-layer weights (`cpu_offload_gb`), streamed back layer by layer.

Offloaded layers keep their weights in one pinned host buffer per layer. The GPU holds K
staging slots (default 2), each the size of the largest offloaded layer. Offloaded layer j (the
j-th offloaded layer in forward order) always runs from slot j % K:

    first forward      copy O[0] .. O[K-1] into slots 0 .. K-1          (side stream)
    before O[j]        compute stream waits for O[j]'s copy; its params point at the slot
    after O[j]         params point back at host memory; slot j % K is released (event), and
                       the side stream copies O[j + K] into it once the release has happened;
                       after the last one, O[0] .. O[K-1] of the next forward, so those copies
                       overlap the end of this step and the host's work between steps

So while O[j] computes, up to K - 1 later offloaded layers are in flight, and a slot is never
overwritten before the layer that used it has finished. Model code does not change: hooks swap
each parameter's `.data` between its host view and its slot view.

CUDA graphs are off while layers are offloaded (model_runner logs it): the hooks run in Python
at every forward, which a replay would skip. Little is lost: an offloaded step waits for its
copies (8 GB at ~50 GB/s is ~160 ms), which hide the host's kernel launches anyway.

Which layers, how the bytes are laid out and the staging order are decided in
worker/offload_plan.py (plain Python, unit-tested on CPU). `LayerStager` is the CUDA machinery;
on CPU it copies synchronously, which the tests use to check the hooks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from distllm.config import parse_cpu_offload_gb
from distllm.logger import init_logger
from distllm.worker.offload_plan import (
    DEFAULT_SLOTS,
    GiB,
    AutoInputs,
    LayerLayout,
    OffloadPlan,
    StagingSchedule,
    auto_offload_count,
    choose_offloaded_layers,
    layer_layout,
    pack_host_chunks,
    spread_layers,
)

if TYPE_CHECKING:
    from distllm.config import EngineConfig
    from distllm.worker.kv_cache import KVCacheSpec

logger = init_logger(__name__)


# ----------------------------------------------------------------------------- model structure


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute name, layer list): the longest ModuleList of the model, which is the
    decoder (or encoder) stack in every model distllm has."""
    best: tuple[nn.Module, str, nn.ModuleList] | None = None
    for _, module in model.named_modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and (best is None or len(child) > len(best[2])):
                best = (module, name, child)
    if best is None:
        raise ValueError(f"cpu_offload_gb: {type(model).__name__} has no layer stack to offload.")
    return best


def _own_params(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # remove_duplicate: a parameter shared inside a layer is stored once.
    return list(layer.named_parameters())


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


# ----------------------------------------------------------------------------- runtime


@dataclass
class _Binding:
    param: nn.Parameter
    host: torch.Tensor  # view into the layer's pinned buffer
    staged: torch.Tensor  # view into the layer's slot


@dataclass
class LayerStager:
    """Hooks that stage offloaded layers through the slots, in StagingSchedule's order."""

    schedule: StagingSchedule
    host_buffers: list[torch.Tensor]  # per position j: flat uint8 buffer of O[j]
    bindings: list[list[_Binding]]  # per position j
    slots: list[torch.Tensor]
    device: torch.device
    prefetch_next: bool = True  # copy the next forward's first layers at the end of each forward
    _issued: set[int] = field(default_factory=set)  # positions copied for the running forward
    _ahead: set[int] = field(default_factory=set)  # positions already copied for the next forward
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in self.slots]
            self.released = [torch.cuda.Event() for _ in self.slots]
            for slot in self.slots:
                # The copies for the next forward may still run when the model is freed: the
                # allocator must not hand a slot's memory out again before they finish.
                slot.record_stream(self.copy_stream)

    def attach(self, parent: nn.Module, layers: nn.ModuleList) -> None:
        # The hooks return None on purpose: a hook's return value would replace the module's
        # inputs (pre-hook) or output (forward hook).
        def on_start(module: nn.Module, args: tuple) -> None:
            self.start()

        def on_enter(j: int):
            def hook(module: nn.Module, args: tuple) -> None:
                self.before(j)
            return hook

        def on_exit(j: int):
            def hook(module: nn.Module, args: tuple, out: object) -> None:
                self.after(j)
            return hook

        self._handles.append(parent.register_forward_pre_hook(on_start))
        for j, idx in enumerate(self.schedule.layers):
            self._handles.append(layers[idx].register_forward_pre_hook(on_enter(j)))
            self._handles.append(layers[idx].register_forward_hook(on_exit(j)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start(self) -> None:
        if self._ahead:
            # The previous forward already issued our first copies (see after()).
            self._issued, self._ahead = self._ahead, set()
            return
        self._issued = set()
        if self.cuda:
            # Whatever the compute stream has queued (an earlier, maybe interrupted, forward's
            # use of a slot included) happens before this forward's copies.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for j in self.schedule.initial():
            self.prefetch(j)

    def prefetch(self, j: int) -> None:
        s = self.schedule.slot_of(j)
        self._issued.add(j)
        if not self.cuda:
            self._copy(s, j)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[s])  # use-before-reuse
            self._copy(s, j)
            self.copied[s].record(self.copy_stream)

    def _copy(self, s: int, j: int) -> None:
        src = self.host_buffers[j]
        self.slots[s][: src.numel()].copy_(src, non_blocking=self.cuda)

    def before(self, j: int) -> None:
        if j not in self._issued:  # a layer run outside its model's forward: copy it now
            self.prefetch(j)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[self.schedule.slot_of(j)])  # copy-before-use
        for b in self.bindings[j]:
            b.param.data = b.staged

    def after(self, j: int) -> None:
        # Back to host views: a stray use between forwards fails loudly instead of reading a reused slot.
        for b in self.bindings[j]:
            b.param.data = b.host
        if self.cuda:
            self.released[self.schedule.slot_of(j)].record(torch.cuda.current_stream(self.device))
        nxt = self.schedule.after(j)
        if nxt is not None:
            self.prefetch(nxt)
        elif self.prefetch_next and j == len(self.schedule.layers) - 1:
            # The last offloaded layer is done: copy the next forward's first layers now, so the
            # copies overlap this step's tail (final layers, logits, sampling, scheduling) too.
            # Each waits for its slot's release like any other copy.
            for k in self.schedule.initial():
                self.prefetch(k)
            self._ahead = set(self.schedule.initial())


def measure_h2d_bandwidth(device: torch.device, src: torch.Tensor | None = None, reps: int = 5) -> float:
    """Pinned host -> device bytes/s, best of `reps` copies (256 MiB unless src is given)."""
    if src is None:
        src = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        dst.copy_(src, non_blocking=True)
        t1.record()
        t1.synchronize()
        best = min(best, t0.elapsed_time(t1) / 1e3)
    del dst
    return src.numel() / best


# ----------------------------------------------------------------------------- placement


def _materialize(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Give every meta parameter not in `skip` (ids) a zeroed tensor on `device`; the loader
    fills them. Tied parameters (one object in two modules) stay one object."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in skip or p.device.type != "meta":
                continue
            if id(p) not in done:
                new = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                new.__dict__.update(p.__dict__)  # weight_loader and friends
                done[id(p)] = new
            module._parameters[name] = done[id(p)]


def _bind_layer(layer: nn.Module, layout: LayerLayout, buf: torch.Tensor, slot: torch.Tensor) -> list[_Binding]:
    """Replace the layer's (meta) parameters by views of its host buffer, each paired with the
    view of the same bytes in its staging slot."""
    bindings, replaced = [], {}
    for ps, (_, p) in zip(layout.params, _own_params(layer)):
        host = buf[ps.offset : ps.offset + ps.nbytes].view(p.dtype).view(p.shape)
        staged = slot[ps.offset : ps.offset + ps.nbytes].view(p.dtype).view(p.shape)
        new = nn.Parameter(host, requires_grad=False)
        new.__dict__.update(p.__dict__)  # weight_loader and friends
        replaced[id(p)] = new
        bindings.append(_Binding(new, host, staged))
    for module in layer.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in replaced:
                module._parameters[name] = replaced[id(p)]
    return bindings


class CpuOffloader:
    """The loader's `place` step: called on a model whose parameters are still on the meta
    device (buffers on the target device). Decides the plan, puts resident parameters on the
    device and offloaded ones in pinned host memory, and installs the LayerStager."""

    def __init__(self, requested: float | str, device: torch.device, auto: "AutoSizer | None" = None,
                 num_slots: int = DEFAULT_SLOTS, prefetch_next: bool = True):
        if num_slots < 1:
            raise ValueError(f"CPU offload needs at least 1 staging slot, got {num_slots}.")
        self.requested = requested
        self.device = device
        self.auto = auto
        self.num_slots = num_slots
        self.prefetch_next = prefetch_next
        self.plan: OffloadPlan | None = None
        self.stager: LayerStager | None = None
        self.h2d_bytes_per_s: float | None = None

    @property
    def active(self) -> bool:
        return self.plan is not None and bool(self.plan.layers)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        parent, _, layers = find_layers(model)
        layouts = [layer_layout([(n, _nbytes(p)) for n, p in _own_params(layer)]) for layer in layers]
        layer_bytes = [lay.nbytes for lay in layouts]
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        fixed = sum(_nbytes(p) for p in model.parameters() if id(p) not in in_layers)
        self.plan = self._decide(layer_bytes, fixed)
        chosen = set(self.plan.layers)
        skip = {id(p) for i in chosen for p in layers[i].parameters()}
        _materialize(model, self.device, skip)
        if not self.plan.layers:
            return
        self.stager = self._build_stager(layers, layouts)
        self.stager.attach(parent, layers)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the meta conversion's transient blocks
            self.h2d_bytes_per_s = measure_h2d_bandwidth(self.device, self.stager.host_buffers[0], reps=3)
        self._log()

    def _build_stager(self, layers: nn.ModuleList, layouts: list[LayerLayout]) -> LayerStager:
        plan, sched = self.plan, self.plan.schedule()
        slots = [torch.empty(plan.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(sched.num_slots)]
        sizes = [layouts[idx].nbytes for idx in plan.layers]
        host: list[torch.Tensor] = []
        for chunk in pack_host_chunks(sizes):
            try:
                whole = torch.empty(sum(sizes[j] for j in chunk), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            except RuntimeError as e:  # cudaHostAlloc failed: not enough host memory to lock
                raise RuntimeError(
                    f"cpu_offload_gb={plan.requested}: cannot allocate {sum(sizes) / GiB:.2f} GiB of pinned host memory "
                    f"for {len(plan.layers)} offloaded layers ({e}). Lower cpu_offload_gb or free host memory."
                ) from None
            host += list(whole.split([sizes[j] for j in chunk]))
        bindings = [_bind_layer(layers[idx], layouts[idx], host[j], slots[sched.slot_of(j)])
                    for j, idx in enumerate(plan.layers)]
        return LayerStager(sched, host, bindings, slots, self.device, self.prefetch_next)

    def _decide(self, layer_bytes: list[int], fixed: int) -> OffloadPlan:
        n_layers = len(layer_bytes)
        if self.requested == "auto":
            if self.auto is None:
                raise ValueError("cpu_offload_gb='auto' needs the device's free memory: it works on CUDA devices only.")
            inputs = self.auto.measure(fixed, layer_bytes)
            n = auto_offload_count(inputs, self.num_slots)
            note = self.auto.describe(inputs, n)
            if n is None:
                logger.warning("%s; offloading every layer, the memory profile will say what does not fit.", note)
                n = n_layers
            else:
                logger.info("%s", note)
            return OffloadPlan("auto", n_layers, spread_layers(n_layers, n), layer_bytes, self.num_slots, note)
        want = int(float(self.requested) * GiB)
        total = sum(layer_bytes)
        if want > total:
            logger.warning(
                "cpu_offload_gb=%g is more than the decoder layers' weights (%.2f GiB): offloading all %d layers "
                "(embedding, LM head and final norm stay on the device).", self.requested, total / GiB, n_layers)
        if self.auto is not None:
            inputs = self.auto.measure(fixed, layer_bytes)
            if auto_offload_count(inputs, self.num_slots) == 0:
                logger.warning(
                    "cpu_offload_gb=%g asked for, but all weights (%.2f GiB) and a KV cache for max_model_len fit in "
                    "GPU memory without offload (%.2f GiB usable); offload makes every step wait for host-to-device "
                    "copies. Use cpu_offload_gb=0 (or 'auto').", self.requested, (fixed + total) / GiB,
                    inputs.usable_bytes / GiB)
        return OffloadPlan(self.requested, n_layers, choose_offloaded_layers(layer_bytes, want), layer_bytes, self.num_slots)

    def _log(self) -> None:
        p = self.plan
        bw = self.h2d_bytes_per_s
        copy_ms = f", pinned H2D {bw / 1e9:.1f} GB/s -> {p.offloaded_bytes / bw * 1e3:.1f} ms of copies per forward" if bw else ""
        asked = p.requested if isinstance(p.requested, str) else f"{p.requested:g}"
        logger.info(
            "CPU offload: %d of %d layers %s in %s host memory, %.2f GiB (cpu_offload_gb=%s); staging %d slots x "
            "%.1f MiB on %s%s%s", len(p.layers), p.num_layers, p.layers, "pinned" if bw else "plain", p.offloaded_bytes / GiB,
            asked, p.schedule().num_slots, p.slot_bytes / 2**20, self.device, copy_ms,
            "" if self.prefetch_next else "; no prefetch across steps")


@dataclass
class AutoSizer:
    """Measures what "auto" (and the "would fit anyway" warning) weigh on a CUDA device."""

    device: torch.device
    gpu_memory_utilization: float
    kv_bytes: int
    headroom_bytes: int

    def measure(self, fixed: int, layer_bytes: list[int]) -> AutoInputs:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Allocations so far (buffers, NCCL, context) are already out of `free`.
        usable = int(total * self.gpu_memory_utilization) - (total - free)
        return AutoInputs(usable, fixed, tuple(layer_bytes), self.kv_bytes, self.headroom_bytes)

    def describe(self, a: AutoInputs, n: int | None) -> str:
        head = (f"cpu_offload_gb=auto: {a.usable_bytes / GiB:.2f} GiB usable, weights {(a.fixed_bytes + sum(a.layer_bytes)) / GiB:.2f} GiB, "
                f"KV for max_model_len {a.kv_bytes / GiB:.2f} GiB, activation headroom {a.headroom_bytes / GiB:.2f} GiB")
        if n is None:
            return head + " -> does not fit even with every layer offloaded"
        if n == 0:
            return head + " -> everything fits, nothing offloaded"
        off = sum(a.layer_bytes[i] for i in spread_layers(len(a.layer_bytes), n))
        return head + f" -> offloading {n} of {len(a.layer_bytes)} layers ({off / GiB:.2f} GiB)"


# Slack beyond the activation estimate. The memory profile (worker/memory.py) counts memory
# outside torch's allocator at its level after the first forward, which can exceed what auto
# sees at load: on an H200 a squeezed tiny fp32 Llama measured 0.95 GiB in use at load and
# 1.34 GiB outside torch's allocator in the profile, with activations 0.2 GiB over the estimate.
# With 256 MiB of slack auto then left no room for the KV cache it had promised.
AUTO_SLACK_BYTES = GiB


def _headroom_bytes(config: "EngineConfig") -> int:
    """The activation peak the memory profile will see (memory_plan's estimate), plus
    AUTO_SLACK_BYTES; 1 GiB where the estimate does not know the architecture."""
    from distllm.worker.memory_plan import DecoderShape, activation_peak_bytes, dtype_bytes

    mc, sc = config.model_config, config.scheduler_config
    try:
        shape = DecoderShape.from_hf(mc.hf_config, mc.architecture)
        peak = activation_peak_bytes(shape, config.parallel_config.tensor_parallel_size, dtype_bytes(mc.dtype),
                                     sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_model_len)
    except (ValueError, KeyError):
        return GiB
    return int(peak * 1.1) + AUTO_SLACK_BYTES


def make_offloader(config: "EngineConfig", device: torch.device, kv_spec: "KVCacheSpec") -> CpuOffloader | None:
    """The `place` step for load_model, or None when no offload is asked (or on CPU, where
    the weights already are in host memory)."""
    requested = parse_cpu_offload_gb(config.cache_config.cpu_offload_gb)
    if requested == 0.0:
        return None
    if device.type != "cuda":
        logger.warning("cpu_offload_gb=%s has no effect on the CPU device: the weights already live in host memory.",
                       requested)
        return None
    sc = config.scheduler_config
    kv_bytes = -(-sc.max_model_len // kv_spec.block_size) * kv_spec.block_bytes
    auto = AutoSizer(device, config.cache_config.gpu_memory_utilization, kv_bytes, _headroom_bytes(config))
    # Tuning knobs for benchmarks (benchmarks/bench_offload.py --slots / --no-prefetch-next).
    slots = int(os.environ.get("DISTLLM_OFFLOAD_SLOTS", DEFAULT_SLOTS))
    prefetch_next = os.environ.get("DISTLLM_OFFLOAD_PREFETCH_NEXT", "1").lower() not in ("0", "false", "no")
    return CpuOffloader(requested, device, auto, num_slots=slots, prefetch_next=prefetch_next)


def iter_offloaded(model: nn.Module, plan: OffloadPlan) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of every offloaded parameter, for tests and logs."""
    parent, attr, layers = find_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i in plan.layers:
        for n, p in layers[i].named_parameters():
            yield f"{prefix}.{i}.{n}", p


def log_graphs_off() -> None:
    logger.info("CUDA graphs off: CPU offload prefetches through host-side hooks, which a graph replay would skip.")

