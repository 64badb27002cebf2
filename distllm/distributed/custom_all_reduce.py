"""Custom all-reduce for the small messages of decode: one-shot over NVLink peer memory.

Why: an NCCL all-reduce of a few KB costs ~35 µs eager and ~20 µs inside a CUDA graph on
2×H200 (NVLink, NVLS off), almost all of it latency; an 8B decode step does 64 of them. A
one-shot all-reduce is one kernel: every rank writes its input into a buffer of every peer,
raises a per-block flag there, waits for the peers' flags in its own buffer and sums
locally. Its cost is one kernel plus one NVLink trip.

Design (option A of the issue): the buffer is torch symmetric memory
(`torch.distributed._symmetric_memory`: `empty` + `rendezvous` map every rank's allocation
into every peer); the kernel is distllm's own Triton kernel, `distllm.ops.triton_all_reduce`
(no CUDA C++ to build just-in-time on the serving host, no IPC handles to exchange by hand,
no NVLS/multimem, which is off on our machines). The kernel's sequence number lives on the
device, so a captured CUDA graph replays correctly any number of times (see that module's
docstring).

Safety: the custom path is used only when every rank agrees it works. Cheap checks first
(CUDA, world size 2/4/8, env switch, one host, peer access, NVLink where NVML can tell),
then the symmetric-memory rendezvous, then a self-test with exact expected sums and a short
spin bound (a broken barrier times out instead of hanging); each step ends with an NCCL
all-reduce of "ok" (MIN), so all ranks take the same path. Any failure logs the reason and
leaves NCCL in charge.

Messages larger than the per-world-size limit go to NCCL: one-shot reads (W-1) x bytes
from peers into every GPU, so its advantage shrinks with W and size (two-shot, or NCCL's
ring, moves less). The limits come from benchmarks/bench_allreduce.py on 4 x H200 (NVLink,
NVLS off; benchmarks/README.md): replayed in a CUDA graph the custom path took 6.7-14.5 µs
against NCCL's 15.6-39.1 µs from 8 KB to 2 MB at W=2, and 10.0-31.8 µs against 20.4-39.2
µs at W=4. DISTLLM_CUSTOM_ALLREDUCE_MAX_BYTES overrides them.

On by default for TP on CUDA; `disable_custom_all_reduce=True` (--disable-custom-all-reduce),
DISTLLM_DISABLE_CUSTOM_ALLREDUCE=1 or DISTLLM_CUSTOM_ALLREDUCE=0 keep NCCL for everything.
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from distllm.logger import init_logger

logger = init_logger(__name__)

ENV_DISABLE = "DISTLLM_DISABLE_CUSTOM_ALLREDUCE"
# "0" turns the path off, like ENV_DISABLE (kept for scripts written when it was opt-in).
ENV_ENABLE = "DISTLLM_CUSTOM_ALLREDUCE"
ENV_MAX_BYTES = "DISTLLM_CUSTOM_ALLREDUCE_MAX_BYTES"
# "1": decode rows' all-reduce + add + RMSNorm through the flag-in-word kernel
# (ops/triton_all_reduce_ll); off: slower than the flag kernel on 2 x H200. Used only when every
# rank sets it.
ENV_LL = "DISTLLM_ALL_REDUCE_LL"
SUPPORTED_WORLD_SIZES = (2, 4, 8)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Largest message the path can take (a decode step of batch 256 x hidden 8192 in bf16, and
# room to benchmark beyond the limits): the size of one (parity, sender) slot. Each rank's
# symmetric buffer holds 2 x world_size slots (16 MB at TP=2, 32 MB at TP=4).
BUFFER_BYTES = 4 << 20
# Largest message sent through the custom path, by world size. One-shot pulls (W-1) x bytes
# over NVLink into every GPU, so the larger W, the sooner NCCL's ring (which moves ~2x bytes
# whatever W) catches up. Measured (module docstring): still 2.7x NCCL at 2 MB for W=2 and
# 1.2x for W=4, so W=2 takes the whole buffer (an 8B decode step up to batch 512) and W=4
# 2 MB. W=8 is a guess (no 8-GPU machine measured yet).
DEFAULT_MAX_BYTES = {2: 4 << 20, 4: 2 << 20, 8: 512 << 10}

# Spin bounds (tries of one system-scope compare-and-swap, ~0.1-1 µs each). The engine's
# is practically infinite: a peer may legitimately be seconds late (host work, compiles).
# The self-test's must catch a broken barrier in seconds, yet outlast rank skew at start-up
# (kernels are compiled before the test, so the skew is small).
ENGINE_MAX_SPIN = 2**31 - 1
SELF_TEST_MAX_SPIN = 1 << 25


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def max_bytes_for(world_size: int, env: Mapping[str, str] = os.environ) -> int:
    """Message-size limit of the custom path: the env override if set, clamped to the buffer."""
    raw = env.get(ENV_MAX_BYTES, "").strip()
    limit = int(raw) if raw else DEFAULT_MAX_BYTES.get(world_size, 0)
    return max(0, min(limit, BUFFER_BYTES))


def ll_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Does this rank ask for the flag-in-word kernel (ENV_LL)? Used when every rank does."""
    return _env_flag(env, ENV_LL)


def unsupported_reason(device_type: str, world_size: int, env: Mapping[str, str] = os.environ) -> str | None:
    """Why this process can't use the custom path, from its own settings alone (None: it can)."""
    if device_type != "cuda":
        return f"device is {device_type}, not cuda"
    if world_size not in SUPPORTED_WORLD_SIZES:
        return f"world size {world_size} not in {SUPPORTED_WORLD_SIZES}"
    if _env_flag(env, ENV_DISABLE):
        return f"{ENV_DISABLE} is set"
    if env.get(ENV_ENABLE, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_ENABLE}={env[ENV_ENABLE]}"
    if max_bytes_for(world_size, env) <= 0:
        return f"{ENV_MAX_BYTES} is 0"
    return None


def topology_reason(hosts: list[int], devices: list[int], rank: int,
                    can_access_peer: Callable[[int, int], bool]) -> str | None:
    """Why the ranks (host id and CUDA device of each) can't address each other's memory."""
    if len(set(hosts)) != 1:
        return "ranks span several hosts"
    if len(set(devices)) != len(devices):
        return f"ranks share CUDA devices {devices}"
    mine = devices[rank]
    for d in devices:
        if d != mine and not can_access_peer(mine, d):
            return f"cuda:{mine} can't access peer cuda:{d}"
    return None


def _nvlink_reason(devices: list[int]) -> str | None:
    """Peer atomics need NVLink (PCIe peer-to-peer has none). Best effort: None when NVML
    is missing or can't tell, so a machine without NVML still gets the self-test."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library: can't tell
        return None
    try:
        handles = []
        for d in devices:
            p = torch.cuda.get_device_properties(d)
            bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            handles.append(pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode()))
        for i, a in enumerate(handles):
            for j, b in enumerate(handles):
                if i < j:
                    status = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                    if status != pynvml.NVML_P2P_STATUS_OK:
                        return f"no NVLink between cuda:{devices[i]} and cuda:{devices[j]}"
        return None
    except Exception as e:  # noqa: BLE001 - can't tell: leave it to the self-test
        logger.debug("NVLink check skipped: %s", e)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _eligible(device_type: str, world_size: int) -> bool:
    """Whether init_custom_all_reduce runs its (collective) checks at all."""
    return device_type == "cuda" and world_size in SUPPORTED_WORLD_SIZES


def _agree(ok: bool, group, device: torch.device) -> bool:
    """True on every rank iff ok on every rank (one NCCL all-reduce, MIN)."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


@dataclass
class CustomAllReduce:
    """One-shot all-reduce over symmetric memory for one process group; see module docstring."""

    rank: int
    world_size: int
    device: torch.device
    max_bytes: int
    peers_u8: tuple  # every rank's buffer (data slots + flags) as uint8, addressable from here
    handle: object = None  # keeps the symmetric-memory mapping alive
    max_spin: int = ENGINE_MAX_SPIN
    err: torch.Tensor = field(default=None)  # int32[1]: timed-out waits (see errors())
    state: torch.Tensor = field(default=None)  # int64[2]: the kernel's sequence number (local)
    _data: dict = field(default_factory=dict)
    flag_addrs: torch.Tensor = field(default=None)  # int64[W]: every rank's flags
    use_ll: bool = False  # decode rows through the flag-in-word kernel (ops/triton_all_reduce_ll)

    def __post_init__(self) -> None:
        from distllm.ops.triton_all_reduce import data_bytes, flag_words
        from distllm.ops.triton_all_reduce_ll import region_bytes

        if self.err is None:
            self.err = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.state is None:
            self.state = torch.zeros(2, dtype=torch.int64, device=self.device)
        # Every rank's buffer: data slots, then flags, then the LL region (buffer_bytes()).
        self.data_bytes = data_bytes(self.world_size, BUFFER_BYTES)
        addrs = [b.data_ptr() + self.data_bytes for b in self.peers_u8]
        self.flag_addrs = torch.tensor(addrs, dtype=torch.int64, device=self.device)
        ll_start = self.data_bytes + 8 * flag_words(self.world_size)
        ll_end = ll_start + region_bytes(self.world_size)
        self.ll_bufs = tuple(b[ll_start:ll_end].view(torch.int64) for b in self.peers_u8)

    def _bufs(self, dtype: torch.dtype) -> tuple:
        bufs = self._data.get(dtype)
        if bufs is None:
            bufs = self._data[dtype] = tuple(b[: self.data_bytes].view(dtype) for b in self.peers_u8)
        return bufs

    def should_use(self, x: torch.Tensor) -> bool:
        return (
            x.device == self.device
            and x.dtype in SUPPORTED_DTYPES
            and x.is_contiguous()
            and 0 < x.numel() * x.element_size() <= self.max_bytes
        )

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum x over the group into out (default: x itself, like dist.all_reduce). Every rank
        must call it with the same shape and dtype, in the same order as its other collectives.
        No host sync and fixed buffers: safe to capture in a CUDA graph."""
        from distllm.ops.triton_all_reduce import launch_one_shot

        if x.numel() * x.element_size() > BUFFER_BYTES:
            raise ValueError(f"{x.numel() * x.element_size()} bytes exceed the {BUFFER_BYTES}-byte buffer")
        out = x if out is None else out
        launch_one_shot(x, out, self._bufs(x.dtype), self.flag_addrs, self.state, self.err, self.rank, self.max_spin)
        return out

    def should_use_fused_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        """Whether all_reduce_add_rms_norm takes these: x as for should_use, [rows, N] rows of at
        most MAX_NORM_ROW elements, residual like x, weight [N] of x's dtype."""
        from distllm.ops.triton_all_reduce import MAX_NORM_ROW

        return (
            self.should_use(x)
            and x.dim() == 2
            and x.shape[1] <= MAX_NORM_ROW
            and (residual is None or residual.shape == x.shape and residual.dtype == x.dtype
                 and residual.is_contiguous())
            and weight.shape == (x.shape[1],)
            and weight.dtype == x.dtype
            and weight.is_contiguous()
        )

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(sum of x + residual), sum of x + residual), fresh tensors, in one kernel
        (see should_use_fused_norm); residual None adds nothing. Graph-safe like all_reduce."""
        from distllm.ops import triton_all_reduce_ll as ll
        from distllm.ops.triton_all_reduce import launch_all_reduce_add_rms_norm

        out, res_out = torch.empty_like(x), torch.empty_like(x)
        if self.use_ll and ll.fits(x.shape[0], x.shape[1], x.element_size()) and x.data_ptr() % 4 == 0:
            ll.launch_ll_all_reduce_add_rms_norm(x, residual, weight, eps, out, res_out, self.ll_bufs, self.state,
                                                 self.err, self.rank, self.max_spin)
            return out, res_out
        launch_all_reduce_add_rms_norm(x, residual, weight, eps, out, res_out, self._bufs(x.dtype), self.flag_addrs,
                                       self.state, self.err, self.rank, self.max_spin)
        return out, res_out

    def errors(self) -> int:
        """Timed-out barrier waits so far (host sync: for tests and the self-test only)."""
        return int(self.err.item())

    def close(self) -> None:
        self._data.clear()
        self.peers_u8, self.flag_addrs, self.handle, self.state, self.ll_bufs = (), None, None, None, ()


def buffer_bytes(world_size: int) -> int:
    """Bytes of one rank's symmetric buffer: the data slots, the flags, the LL region."""
    from distllm.ops.triton_all_reduce import data_bytes, flag_words
    from distllm.ops.triton_all_reduce_ll import region_bytes

    return data_bytes(world_size, BUFFER_BYTES) + 8 * flag_words(world_size) + region_bytes(world_size)


def _symmetric_buffer(nbytes: int, group, rank: int, world_size: int, device: torch.device):
    """Allocate and map one symmetric buffer; returns (handle, every rank's uint8 view)."""
    import torch.distributed._symmetric_memory as symm_mem

    name = group.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed by older torch, a deprecated no-op later
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(name)
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buf.zero_()  # every flag starts at 0 ...
    torch.cuda.synchronize(device)  # ... before any peer can see this buffer
    hdl = symm_mem.rendezvous(buf, name)
    if hdl.world_size != world_size or hdl.rank != rank:
        raise RuntimeError(f"symmetric memory says rank {hdl.rank}/{hdl.world_size}, expected {rank}/{world_size}")
    # A pooled allocation may place buf inside a larger mapped block, and torch versions differ
    # in whether buffer_ptrs / get_buffer count from the block or from the tensor. Take the
    # storage offset that maps this rank's own view onto buf; peers' copies sit at the same
    # offset (same allocation sequence on every rank; the caller checks it is the same).
    def maps_onto_buf(offset: int) -> bool:
        try:
            return offset >= 0 and hdl.get_buffer(rank, (nbytes,), torch.uint8, offset).data_ptr() == buf.data_ptr()
        except Exception:  # noqa: BLE001 - out of the mapped range: not this candidate
            return False

    for offset in dict.fromkeys((0, buf.data_ptr() - hdl.buffer_ptrs[rank])):
        if maps_onto_buf(offset):
            break
    else:
        raise RuntimeError("can't locate this rank's buffer in its symmetric-memory handle")
    views = tuple(buf if p == rank else hdl.get_buffer(p, (nbytes,), torch.uint8, offset) for p in range(world_size))
    return hdl, views, offset


def _self_test_sizes(car: CustomAllReduce) -> list[int]:
    """bf16 element counts: one element; several tiles and a tail; the size limit."""
    return sorted({1, 4099, max(1, car.max_bytes // 2)})


def _self_test(car: CustomAllReduce) -> str | None:
    """Exact sums of small integers (exact in any order, in every dtype) for a few sizes,
    back to back (both parities, changing grids), then the same with a changed input; None
    when all pass."""
    dev = car.device
    sizes = _self_test_sizes(car)
    ranks = torch.arange(car.world_size, device=dev).view(-1, 1)
    results = []
    for salt in (0, 5):
        for n in sizes:
            i = torch.arange(n, device=dev).view(1, -1)
            table = ((i * (ranks + 1) + ranks + salt) % 17 - 8).to(torch.bfloat16)  # [W, n]
            want = table.float().sum(0).to(torch.bfloat16)
            results.append((car.all_reduce(table[car.rank].clone()), want, n))  # clone: in place
    torch.cuda.synchronize(dev)
    if car.errors():
        return f"self-test: {car.errors()} barrier waits timed out"
    for got, want, n in results:
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[:4].flatten().tolist()
            return f"self-test: wrong sum for {n} bf16 elements at {bad}"
    return _self_test_ll(car) if car.use_ll else None


def _ll_self_test_shapes() -> list[tuple[int, int]]:
    return [(1, 4096), (3, 576)]


def _self_test_ll(car: CustomAllReduce) -> str | None:
    """The LL kernel, after the flag kernel's calls above (they share the call count): exact
    sums of small integers in the residual output (residual 0), twice with changed inputs."""
    dev = car.device
    ranks = torch.arange(car.world_size, device=dev).view(-1, 1, 1)
    results = []
    for salt in (1, 2):
        for rows, n in _ll_self_test_shapes():
            i = torch.arange(rows * n, device=dev).view(1, rows, n)
            table = ((i * (ranks + 2) + ranks + salt) % 13 - 6).to(torch.bfloat16)  # [W, rows, n]
            want = table.float().sum(0).to(torch.bfloat16)
            zero, ones = torch.zeros_like(table[0]), torch.ones(n, dtype=torch.bfloat16, device=dev)
            out, res = car.all_reduce_add_rms_norm(table[car.rank].contiguous(), zero, ones, 1e-5)
            results.append((res, out, want, (rows, n)))
    torch.cuda.synchronize(dev)
    if car.errors():
        return f"LL self-test: {car.errors()} waits timed out"
    for res, out, want, shape in results:
        if not torch.equal(res, want) or not bool(torch.isfinite(out).all()):
            return f"LL self-test: wrong sum for {shape} bf16 rows"
    return None


def _precompile(car: CustomAllReduce) -> None:
    """Compile the bf16 kernel before the self-test, so no rank spins while a peer compiles."""
    from distllm.ops.triton_all_reduce import one_shot_all_reduce_kernel, one_shot_options

    warmup = getattr(one_shot_all_reduce_kernel, "warmup", None)
    if warmup is None:
        return
    try:
        # Triton specializes n (== 1, divisible by 16, other): one compile per self-test size.
        for n in _self_test_sizes(car):
            x = torch.empty(n, dtype=torch.bfloat16, device=car.device)
            bufs = car._bufs(x.dtype)
            warmup(x, x, bufs, car.flag_addrs, car.state, car.err, n, bufs[0].numel() // (2 * car.world_size),
                   car.max_spin, **one_shot_options(car.rank, car.world_size, x), grid=(1,))
        if car.use_ll:
            from distllm.ops.triton_all_reduce_ll import ll_all_reduce_add_rms_norm_kernel, ll_options

            for rows, n in _ll_self_test_shapes():
                x = torch.empty(rows, n, dtype=torch.bfloat16, device=car.device)
                ll_all_reduce_add_rms_norm_kernel.warmup(
                    x, x, x[0], x, x, car.ll_bufs, car.state, car.err, rows, n, 1e-5,
                    car.ll_bufs[0].numel() // (2 * car.world_size), car.max_spin,
                    **ll_options(car.rank, car.world_size, x), grid=(1,))
    except Exception as e:  # noqa: BLE001 - only an optimisation: the first launch compiles
        logger.debug("custom all-reduce: precompile skipped: %s", e)


def init_custom_all_reduce(group, rank: int, world_size: int, device: torch.device) -> CustomAllReduce | None:
    """Collective over `group` (every rank calls it): a working CustomAllReduce on every rank,
    or None on every rank, with the reason logged."""
    reason = unsupported_reason(device.type, world_size)
    if not _eligible(device.type, world_size):
        # Same answer on every rank (same device kind, same world): no collective needed.
        logger.debug("custom all-reduce off: %s", reason)
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def off(why: str) -> None:
        if rank == 0 or why != "another rank failed":
            logger.info("custom all-reduce off (NCCL all-reduce only): %s", why)

    # 1. Settings and topology, agreed on by every rank. The size limit too: a message taking
    # the custom path on one rank and NCCL on another would hang both.
    host = zlib.crc32(os.uname().nodename.encode())
    index = -1 if device.index is None else device.index
    info = torch.tensor([host, index, max_bytes_for(world_size), int(ll_requested())], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(info) for _ in range(world_size)]
    dist.all_gather(gathered, info, group=group)
    hosts = [int(t[0]) for t in gathered]
    devices = [int(t[1]) for t in gathered]
    max_bytes = min(int(t[2]) for t in gathered)
    use_ll = all(int(t[3]) for t in gathered)  # every rank, or none: a mix would wait forever
    if reason is None:
        reason = topology_reason(hosts, devices, rank, torch.cuda.can_device_access_peer)
    if reason is None:
        reason = _nvlink_reason(devices)
    if not _agree(reason is None, group, device):
        off(reason or "another rank failed")
        return None

    # 2. Symmetric memory (and the kernel module: a Triton that fails to import means NCCL).
    car, offset = None, 0
    try:
        hdl, views, offset = _symmetric_buffer(buffer_bytes(world_size), group, rank, world_size, device)
        car = CustomAllReduce(rank=rank, world_size=world_size, device=device, max_bytes=max_bytes,
                              peers_u8=views, handle=hdl, use_ll=use_ll)
    except Exception as e:  # noqa: BLE001 - any failure here means NCCL only
        reason = f"symmetric memory: {type(e).__name__}: {e}"
    offsets = torch.tensor([offset], dtype=torch.int64, device=device)
    peer_offsets = [torch.empty_like(offsets) for _ in range(world_size)]
    dist.all_gather(peer_offsets, offsets, group=group)
    if reason is None and len({int(t) for t in peer_offsets}) != 1:
        reason = f"symmetric buffers at different offsets {[int(t) for t in peer_offsets]}"
    if not _agree(reason is None, group, device):
        off(reason or "another rank failed")
        return None

    # 3. Self-test with a short spin bound, then the engine's bound.
    _precompile(car)
    torch.cuda.synchronize(device)
    _agree(True, group, device)  # start the test together
    car.max_spin = SELF_TEST_MAX_SPIN
    try:
        reason = _self_test(car)
    except Exception as e:  # noqa: BLE001
        reason = f"self-test: {type(e).__name__}: {e}"
    car.max_spin = ENGINE_MAX_SPIN
    if not _agree(reason is None, group, device):
        off(reason or "another rank failed")
        car.close()
        return None
    if rank == 0:
        logger.info("custom all-reduce on: one-shot over NVLink, %d ranks, messages <= %d KB (larger: NCCL)%s",
                    world_size, car.max_bytes >> 10,
                    "; decode rows' all-reduce + norm with the flag in every word (LL)" if car.use_ll else "")
    return car


def enable_for_tp(device: torch.device, disabled: bool = False) -> bool:
    """Set up the custom path for the TP group made by init_tensor_parallel (collective: every
    TP rank calls it after init_tensor_parallel). True when tp_all_reduce will use it.
    `disabled` is the engine's disable_custom_all_reduce (the same on every rank)."""
    from distllm.distributed import parallel_state as ps

    if ps.get_tp_size() == 1:
        return False
    if disabled:
        if ps.get_tp_rank() == 0:
            logger.info("custom all-reduce off (NCCL all-reduce only): disable_custom_all_reduce is set")
        return False
    car = init_custom_all_reduce(ps.get_tp_group(), ps.get_tp_rank(), ps.get_tp_size(), device)
    ps.set_custom_all_reduce(car)
    return car is not None
