"""The bookkeeping of CPU offload, in plain Python (no torch): which decoder layers go to host
memory for a given cpu_offload_gb, how each layer's parameters pack into one flat buffer, the
order in which a forward pass stages them through the GPU slots, and the "auto" arithmetic.
worker/offload.py does what this decides.

Which layers: whole layers, spread evenly with each offloaded layer at the end of its group
(`spread_layers`). A transfer then overlaps the compute of the resident layers before its
layer, so a step costs about max(compute, transfer) rather than their sum, which is what
offloading the last N layers in a block would give once the first copies are done.
How many: the fewest whose bytes reach `cpu_offload_gb` GiB (vLLM's "at least N GB" reading),
or, for "auto", the fewest that leave room for the KV cache of one max_model_len sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
ALIGN = 256  # byte alignment of each parameter inside a layer's flat buffer (cuBLAS-friendly)
DEFAULT_SLOTS = 2


def spread_layers(num_layers: int, n: int) -> list[int]:
    """n of num_layers layer indices, evenly spaced, each at the end of its group of
    num_layers / n layers (n=1 -> the last layer; n=num_layers -> all)."""
    if not 0 <= n <= num_layers:
        raise ValueError(f"cannot offload {n} of {num_layers} layers")
    return [((i + 1) * num_layers) // n - 1 for i in range(n)]


def choose_offloaded_layers(layer_bytes: list[int], offload_bytes: int) -> list[int]:
    """The fewest spread-out layers whose weights add up to at least offload_bytes."""
    if offload_bytes <= 0:
        return []
    for n in range(1, len(layer_bytes) + 1):
        chosen = spread_layers(len(layer_bytes), n)
        if sum(layer_bytes[i] for i in chosen) >= offload_bytes:
            return chosen
    return list(range(len(layer_bytes)))


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives inside its layer's flat byte buffer."""

    name: str  # relative to the layer module
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    params: tuple[ParamSlot, ...]
    nbytes: int  # the flat buffer's size, alignment padding included


def layer_layout(params: list[tuple[str, int]]) -> LayerLayout:
    """Pack (name, nbytes) parameters into one buffer, each starting at an ALIGN boundary."""
    out, off = [], 0
    for name, nbytes in params:
        out.append(ParamSlot(name, off, nbytes))
        off += -(-nbytes // ALIGN) * ALIGN
    return LayerLayout(tuple(out), off)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pack_host_chunks(sizes: list[int]) -> list[list[int]]:
    """Group consecutive layer buffers (positions) into pinned allocations. PyTorch's pinned
    allocator rounds every request up to a power of two (a 436 MB Llama-8B layer takes 512 MiB),
    so each chunk takes the run of layers that fills its power of two best (the longer run on a
    tie: fewer allocations). Sizes must be multiples of ALIGN, so every layer starts aligned."""
    chunks, i = [], 0
    while i < len(sizes):
        best_k, best_fill, total = 1, 0.0, 0
        for k in range(1, len(sizes) - i + 1):
            total += sizes[i + k - 1]
            fill = total / _pow2_ceil(total)
            if fill >= best_fill:
                best_k, best_fill = k, fill
        chunks.append(list(range(i, i + best_k)))
        i += best_k
    return chunks


@dataclass(frozen=True)
class StagingSchedule:
    """Which slot each offloaded layer uses and when its copy is issued (host order)."""

    layers: tuple[int, ...]  # offloaded layer indices, in forward order
    num_slots: int

    def slot_of(self, j: int) -> int:
        return j % self.num_slots

    def initial(self) -> list[int]:
        """The positions copied before a forward begins (one per slot): at the first forward's
        start, and at the end of every forward for the next."""
        return list(range(min(self.num_slots, len(self.layers))))

    def after(self, j: int) -> int | None:
        """The position whose copy is issued once O[j] has released its slot."""
        nxt = j + self.num_slots
        return nxt if nxt < len(self.layers) else None

    def events(self, first: bool = True) -> list[tuple[str, int, int]]:
        """One forward pass as (op, layer index, slot), op in prefetch / use / release. The
        first forward copies its first K layers at its start; every forward ends by copying
        the next forward's first K layers, once their slots are released."""
        ev = [("prefetch", self.layers[j], self.slot_of(j)) for j in self.initial()] if first else []
        for j, layer in enumerate(self.layers):
            ev.append(("use", layer, self.slot_of(j)))
            ev.append(("release", layer, self.slot_of(j)))
            nxt = self.after(j)
            if nxt is not None:
                ev.append(("prefetch", self.layers[nxt], self.slot_of(nxt)))
        ev += [("prefetch", self.layers[j], self.slot_of(j)) for j in self.initial()]
        return ev


@dataclass(frozen=True)
class AutoInputs:
    """What "auto" weighs, per rank, in bytes."""

    usable_bytes: int  # what new allocations may take under gpu_memory_utilization, measured
    fixed_bytes: int  # weights that always stay (embedding, LM head, final norm)
    layer_bytes: tuple[int, ...]  # each decoder layer's weights
    kv_bytes: int  # KV cache for max_model_len tokens
    headroom_bytes: int  # activation peak and allocator slack


def auto_offload_count(a: AutoInputs, num_slots: int = DEFAULT_SLOTS) -> int | None:
    """The fewest layers to offload (spread) so weights + staging + KV + headroom fit;
    None when even offloading every layer is not enough."""
    n_layers = len(a.layer_bytes)
    for n in range(n_layers + 1):
        chosen = spread_layers(n_layers, n)
        off = sum(a.layer_bytes[i] for i in chosen)
        staging = min(num_slots, n) * max((a.layer_bytes[i] for i in chosen), default=0)
        need = a.fixed_bytes + sum(a.layer_bytes) - off + staging + a.kv_bytes + a.headroom_bytes
        if need <= a.usable_bytes:
            return n
    return None


@dataclass
class OffloadPlan:
    requested: float | str
    num_layers: int
    layers: list[int]  # offloaded layer indices
    layer_bytes: list[int]  # every layer's flat-buffer size
    num_slots: int
    note: str = ""  # how "auto" decided

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.layer_bytes[i] for i in self.layers)

    @property
    def slot_bytes(self) -> int:
        return max((self.layer_bytes[i] for i in self.layers), default=0)

    @property
    def staging_bytes(self) -> int:
        return self.slot_bytes * min(self.num_slots, len(self.layers))

    def schedule(self) -> StagingSchedule:
        return StagingSchedule(tuple(self.layers), min(self.num_slots, max(1, len(self.layers))))
