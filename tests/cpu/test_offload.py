"""CPU offload (cpu_offload_gb): which layers go to host memory, the byte layout, the staging
order, the "auto" arithmetic, config validation, and the hooks on a real (tiny) model on CPU,
where the staging copies are synchronous."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from distllm.config import EngineArgs, EngineConfig, parse_cpu_offload_gb
from distllm.worker import offload as off
from distllm.worker.offload import AutoSizer, CpuOffloader, iter_offloaded
from distllm.worker.offload_plan import (
    AutoInputs,
    OffloadPlan,
    StagingSchedule,
    auto_offload_count,
    choose_offloaded_layers,
    layer_layout,
    spread_layers,
)

GiB = 2**30


@pytest.fixture
def offload_log(caplog):
    """The distllm logger does not propagate to the root logger: listen on it directly."""
    lg = logging.getLogger("distllm")
    lg.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    lg.removeHandler(caplog.handler)


# ---- which layers ----------------------------------------------------------------------------


def test_spread_layers_exact():
    assert spread_layers(32, 1) == [31]
    assert spread_layers(8, 2) == [3, 7]
    assert spread_layers(8, 3) == [1, 4, 7]
    assert spread_layers(32, 20) == [0, 2, 3, 5, 7, 8, 10, 11, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29, 31]
    assert spread_layers(4, 4) == [0, 1, 2, 3]
    assert spread_layers(5, 0) == []
    with pytest.raises(ValueError):
        spread_layers(4, 5)


def test_choose_layers_reaches_requested_bytes():
    assert choose_offloaded_layers([100] * 8, 0) == []
    assert choose_offloaded_layers([100] * 8, 100) == [7]
    assert choose_offloaded_layers([100] * 8, 101) == [3, 7]
    assert choose_offloaded_layers([100] * 8, 250) == [1, 4, 7]
    assert choose_offloaded_layers([100] * 8, 10**9) == list(range(8))
    # Llama-3.1-8B shape, bf16, one rank: 8 GiB is 19.7 layers -> 20 whole layers (at least N GiB).
    layer = 2 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)
    chosen = choose_offloaded_layers([layer] * 32, 8 * GiB)
    assert len(chosen) == 20 and chosen == spread_layers(32, 20)
    assert sum([layer] * 20) >= 8 * GiB > sum([layer] * 19)


def test_pack_host_chunks_fills_powers_of_two():
    from distllm.worker.offload_plan import pack_host_chunks

    mib = 2**20
    assert pack_host_chunks([]) == []
    assert pack_host_chunks([512 * mib] * 3) == [[0, 1], [2]]  # 1 GiB exactly, then 512 MiB exactly
    # Llama-3.1-8B layers (416 MiB, 0.81 of 512 MiB): 20 of them in 2 allocations, not 20.
    layer = 2 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)
    chunks = pack_host_chunks([layer] * 20)
    assert [j for c in chunks for j in c] == list(range(20))
    assert [len(c) for c in chunks] == [19, 1]  # 19 x 416 MiB = 7904 MiB of 8 GiB, then 416 of 512 MiB
    pinned = sum(1 << (len(c) * layer - 1).bit_length() for c in chunks)
    assert pinned == 8 * 2**30 + 512 * mib  # instead of 20 x 512 MiB = 10 GiB


def test_layer_layout_aligns_each_param():
    lay = layer_layout([("a", 10), ("b", 512), ("c", 3)])
    assert [(p.name, p.offset, p.nbytes) for p in lay.params] == [("a", 0, 10), ("b", 256, 512), ("c", 768, 3)]
    assert lay.nbytes == 1024


# ---- staging order -------------------------------------------------------------------------------


def test_schedule_events_exact():
    s = StagingSchedule((1, 3, 5, 7), 2)
    assert s.events() == [
        ("prefetch", 1, 0), ("prefetch", 3, 1),
        ("use", 1, 0), ("release", 1, 0), ("prefetch", 5, 0),
        ("use", 3, 1), ("release", 3, 1), ("prefetch", 7, 1),
        ("use", 5, 0), ("release", 5, 0),
        ("use", 7, 1), ("release", 7, 1),
        ("prefetch", 1, 0), ("prefetch", 3, 1),  # the next forward's first layers
    ]
    assert s.events(first=False) == s.events()[2:]


@pytest.mark.parametrize("n,k", [(1, 2), (2, 2), (5, 2), (7, 3), (6, 1), (3, 4)])
def test_schedule_invariants(n, k):
    """Copy before use, never overwrite a slot in use, at most k - 1 layers ahead of the one computing."""
    layers = tuple(spread_layers(max(n, 8), n))
    s = StagingSchedule(layers, k)
    holder: dict[int, int | None] = {}  # slot -> layer copied into it and not yet released
    used, ahead_max = [], 0
    for op, layer, slot in s.events() + s.events(first=False):
        if op == "prefetch":
            assert holder.get(slot) is None, f"slot {slot} overwritten while layer {holder.get(slot)} holds it"
            holder[slot] = layer
        elif op == "use":
            assert holder.get(slot) == layer, f"layer {layer} used before its copy reached slot {slot}"
            used.append(layer)
            in_flight = [v for v in holder.values() if v is not None and v != layer]
            ahead_max = max(ahead_max, len(in_flight))
        else:
            assert holder[slot] == layer
            holder[slot] = None
    assert used == 2 * list(layers)
    assert ahead_max <= k - 1
    assert ahead_max == min(k, n) - 1  # and the prefetch distance is used in full


# ---- "auto" ----------------------------------------------------------------------------------


def test_auto_count_charges_staging():
    base = dict(fixed_bytes=100, layer_bytes=(100,) * 8, kv_bytes=150, headroom_bytes=50)
    assert auto_offload_count(AutoInputs(usable_bytes=1100, **base)) == 0
    # 1 or 2 layers off free nothing net (2 staging slots); 3 are the fewest that fit.
    assert auto_offload_count(AutoInputs(usable_bytes=1000, **base)) == 3
    assert auto_offload_count(AutoInputs(usable_bytes=499, **base)) is None
    assert auto_offload_count(AutoInputs(usable_bytes=500, **base)) == 8


def test_auto_sizer_measures_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * GiB, 10 * GiB))
    sizer = AutoSizer(torch.device("cuda", 0), 0.9, kv_bytes=GiB, headroom_bytes=GiB // 2)
    a = sizer.measure(fixed=GiB, layer_bytes=[GiB // 4] * 16)
    assert a.usable_bytes == int(9 * GiB) - 4 * GiB  # 90 % of 10 GiB, less the 4 GiB already in use
    # 1 + 4 + 1 + 0.5 = 6.5 GiB wanted, 5 usable: offload n with n/4 - min(2, n)/4 >= 1.5 -> n = 8.
    assert auto_offload_count(a) == 8
    assert "offloading 8 of 16 layers (2.00 GiB)" in sizer.describe(a, 8)


class _FakeSizer:
    """AutoSizer with fixed measurements (no CUDA device needed)."""

    def __init__(self, usable: int, kv: int = 0, headroom: int = 0):
        self.usable, self.kv, self.headroom = usable, kv, headroom

    def measure(self, fixed, layer_bytes):
        return AutoInputs(self.usable, fixed, tuple(layer_bytes), self.kv, self.headroom)

    def describe(self, a, n):
        return AutoSizer.describe(self, a, n)  # type: ignore[arg-type]


def test_decide_auto_and_warnings(offload_log):
    layers = [1000] * 6
    auto = CpuOffloader("auto", torch.device("cpu"), _FakeSizer(usable=200 + 6000 - 2500 + 2000, kv=300))
    plan = auto._decide(layers, fixed=200)
    # 6200 weights + 300 KV = 6500 wanted, 5700 usable: 3 off frees 3000 - 2000 staging = 1000 >= 800.
    assert plan.layers == spread_layers(6, 3) == [1, 3, 5] and plan.offloaded_bytes == 3000
    assert plan.slot_bytes == 1000 and plan.staging_bytes == 2000
    assert "cpu_offload_gb=auto" in offload_log.text and "offloading 3 of 6 layers" in offload_log.text

    offload_log.clear()
    fits = CpuOffloader(500 / GiB, torch.device("cpu"), _FakeSizer(usable=10**6))
    assert fits._decide(layers, fixed=200).layers == [5]
    assert "fit in GPU memory without offload" in offload_log.text

    offload_log.clear()
    too_much = CpuOffloader(100.0, torch.device("cpu"), _FakeSizer(usable=0))
    assert too_much._decide(layers, fixed=200).layers == list(range(6))
    assert "more than the decoder layers' weights" in offload_log.text
    assert "without offload" not in offload_log.text

    offload_log.clear()
    nothing_fits = CpuOffloader("auto", torch.device("cpu"), _FakeSizer(usable=100))
    assert nothing_fits._decide(layers, fixed=200).layers == list(range(6))
    assert "does not fit even with every layer offloaded" in offload_log.text

    with pytest.raises(ValueError, match="auto"):
        CpuOffloader("auto", torch.device("cpu"), None)._decide(layers, fixed=200)


# ---- config ------------------------------------------------------------------------------------


def test_config_accepts_number_or_auto():
    assert EngineArgs(cpu_offload_gb="auto").cpu_offload_gb == "auto"
    assert EngineArgs(cpu_offload_gb=" AUTO ").cpu_offload_gb == "auto"
    assert EngineArgs(cpu_offload_gb="8").cpu_offload_gb == 8.0
    assert EngineArgs(cpu_offload_gb=2).cpu_offload_gb == 2.0
    for bad in ("lots", float("nan"), float("inf"), True, None, ""):
        with pytest.raises(ValueError, match="cpu_offload_gb must be a number of GiB >= 0 or 'auto'"):
            EngineArgs(cpu_offload_gb=bad)
    for neg in (-1, "-0.5"):
        with pytest.raises(ValueError, match="cpu_offload_gb must be >= 0, got -"):
            EngineArgs(cpu_offload_gb=neg)
    assert parse_cpu_offload_gb(0) == 0.0


def test_cli_accepts_auto():
    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(p.parse_args(["--cpu-offload-gb", "auto"])).cpu_offload_gb == "auto"
    assert EngineArgs.from_cli_args(p.parse_args(["--cpu-offload-gb", "4.5"])).cpu_offload_gb == 4.5
    assert EngineArgs.from_cli_args(p.parse_args([])).cpu_offload_gb == 0.0
    with pytest.raises(SystemExit):
        p.parse_args(["--cpu-offload-gb", "lots"])


def test_engine_config_round_trip_with_auto(tiny_models):
    cfg = EngineArgs(model=tiny_models["llama"], device="cpu", cpu_offload_gb="auto").create_engine_config()
    assert cfg.cache_config.cpu_offload_gb == "auto"
    back = EngineConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.cache_config.cpu_offload_gb == "auto"


# ---- the hooks on a tiny model (CPU: synchronous staging copies) -------------------------------


def _model_config(tiny_models, kind="llama", **kw):
    return EngineArgs(model=tiny_models[kind], device="cpu", **kw).create_engine_config().model_config


def _forward(model, n_tokens: int = 11, seed: int = 0) -> torch.Tensor:
    """One fresh prefill of a single sequence, no KV cache (as the memory profile runs it)."""
    from distllm.layers.attention import AttentionMetadata, forward_context

    ids = torch.randint(100, 49152, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    meta = AttentionMetadata(
        slot_mapping=torch.full((n_tokens,), -1, dtype=torch.int64),
        block_tables=torch.zeros((1, 1), dtype=torch.int32),
        seq_lens=torch.tensor([n_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n_tokens], dtype=torch.int32),
        max_query_len=n_tokens, max_seq_len=n_tokens, fresh_prefill_only=True,
    )
    with torch.inference_mode(), forward_context(meta, None):
        return model.compute_logits(model(ids, torch.arange(n_tokens)))


def _load(mc, offloader=None):
    from distllm.models.loader import load_model

    return load_model(mc, torch.device("cpu"), seed=3, place=offloader)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_offloaded_model_equals_plain(tiny_models, kind):
    mc = _model_config(tiny_models, kind)
    plain = _load(mc)
    layer_bytes = sum(p.numel() * 4 for p in plain.model.layers[0].parameters())
    o = CpuOffloader(layer_bytes / GiB, torch.device("cpu"))  # exactly one layer's bytes -> the last layer
    model = _load(mc, o)
    assert o.active and o.plan.layers == [1] and o.plan.offloaded_bytes == layer_bytes
    names = sorted(n for n, _ in iter_offloaded(model, o.plan))
    assert names == sorted(f"model.layers.1.{n}" for n, _ in plain.model.layers[1].named_parameters())
    # The weights loaded into the host buffers equal the plain model's, parameter by parameter.
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    if kind == "qwen2":  # tied LM head: still one parameter with the embedding
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for seed in (0, 1):  # twice: the second forward starts from released slots
        assert torch.equal(_forward(plain, seed=seed), _forward(model, seed=seed))


def test_hooks_follow_schedule_and_restore_host_views(tiny_models):
    mc = _model_config(tiny_models, "llama", hf_overrides={"num_hidden_layers": 6}, load_format="dummy")
    plain = _load(mc)
    layer_bytes = sum(p.numel() * 4 for p in plain.model.layers[0].parameters())
    o = CpuOffloader(3 * layer_bytes / GiB, torch.device("cpu"))
    model = _load(mc, o)
    assert o.plan.layers == [1, 3, 5]
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), model.named_parameters()):
        assert torch.equal(p1, p2), n1  # dummy weights drawn identically
    st = o.stager
    slot_ptrs = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in st.slots]
    seen: list[tuple[str, int, int]] = []

    def in_slot(t: torch.Tensor) -> int | None:
        return next((i for i, (a, b) in enumerate(slot_ptrs) if a <= t.data_ptr() < b), None)

    real_prefetch = st.prefetch

    def prefetch(j):
        seen.append(("prefetch", o.plan.layers[j], st.schedule.slot_of(j)))
        real_prefetch(j)

    st.prefetch = prefetch
    real_after = st.after

    def after(j):
        seen.append(("release", o.plan.layers[j], in_slot(model.model.layers[o.plan.layers[j]].mlp.down_proj.weight)))
        real_after(j)

    st.after = after
    for idx in range(6):  # record, from inside each layer's forward, where its weight lives
        def probe(m, a, idx=idx):
            s = in_slot(m.self_attn.qkv_proj.weight)
            if idx in o.plan.layers:
                seen.append(("use", idx, s))
            else:
                assert s is None
        model.model.layers[idx].register_forward_pre_hook(probe)  # runs after the stager's own hook
    for first in (True, False, False):
        seen.clear()
        assert torch.equal(_forward(plain), _forward(model))
        assert seen == StagingSchedule((1, 3, 5), 2).events(first=first)
    # Between forwards every offloaded parameter is its host view again.
    for _, p in iter_offloaded(model, o.plan):
        assert in_slot(p) is None and p.device.type == "cpu"
    assert st.slots[0].numel() == layer_bytes


def test_plan_properties():
    p = OffloadPlan(4.0, 4, [1, 3], [10, 20, 30, 40], 2)
    assert (p.offloaded_bytes, p.slot_bytes, p.staging_bytes) == (60, 40, 80)
    assert p.schedule() == StagingSchedule((1, 3), 2)
    one = OffloadPlan(1.0, 4, [3], [10, 20, 30, 40], 2)
    assert one.staging_bytes == 40 and one.schedule().num_slots == 1


# ---- engine level on CPU --------------------------------------------------------------------


def test_make_offloader_is_a_noop_on_cpu(tiny_models, offload_log):
    from distllm.worker.kv_cache import KVCacheSpec

    spec = KVCacheSpec(2, 16, 2, 16, torch.float32)
    cfg = EngineArgs(model=tiny_models["llama"], device="cpu", cpu_offload_gb=1).create_engine_config()
    assert off.make_offloader(cfg, torch.device("cpu"), spec) is None
    assert "no effect on the CPU device" in offload_log.text
    cfg0 = EngineArgs(model=tiny_models["llama"], device="cpu").create_engine_config()
    assert off.make_offloader(cfg0, torch.device("cpu"), spec) is None


@pytest.mark.parametrize("setting", [0.5, "auto"])
def test_llm_generate_with_offload_setting_on_cpu(tiny_models, setting, offload_log):
    from distllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [5, 900, 1200, 77]}, {"prompt_token_ids": list(range(300, 330))}]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(**kw):
        with LLM(model=tiny_models["llama"], device="cpu", **kw) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]

    assert run(cpu_offload_gb=setting) == run()
    assert "no effect on the CPU device" in offload_log.text


# ---- stream ordering, simulated ------------------------------------------------------------------
#
# LayerStager's CUDA path, run against fake streams and events that log every operation in host
# order. A small simulator then gives each op a start and end time under CUDA's rules (a stream
# runs its ops in order; wait_event waits for the event's latest record at the time the wait was
# enqueued; wait_stream waits for the other stream's work enqueued so far), with copies and
# layer computes of chosen durations, and checks that no layer computes from a slot whose copy
# is unfinished or that a later copy is overwriting.


class _FakeEvent:
    def __init__(self, log):
        self.log, self.last = log, None

    def record(self, stream=None):
        stream = stream or _FakeCuda.current
        self.last = stream.enqueue(("record",))

    def wait(self, stream):
        stream.enqueue(("wait_event", self.last))


class _FakeStream:
    def __init__(self, log, name):
        self.log, self.name, self.last = log, name, None

    def enqueue(self, op):
        self.log.append((self.name,) + op)
        self.last = len(self.log) - 1
        return self.last

    def wait_event(self, ev):
        ev.wait(self)

    def wait_stream(self, other):
        self.enqueue(("wait_op", other.last))


class _FakeCuda:
    current: _FakeStream

    def __init__(self):
        self.log: list[tuple] = []
        self.compute = _FakeStream(self.log, "compute")
        _FakeCuda.current = self.compute

    def install(self, monkeypatch):
        from contextlib import contextmanager

        @contextmanager
        def stream(s):
            prev, _FakeCuda.current = _FakeCuda.current, s
            try:
                yield
            finally:
                _FakeCuda.current = prev

        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(self.log, "copy"))
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: _FakeEvent(self.log))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeCuda.current)
        monkeypatch.setattr(torch.cuda, "stream", stream)


def _simulate(log, copy_s: float, compute_s: float) -> list[tuple[float, float]]:
    """(start, end) of every logged op."""
    times: list[tuple[float, float]] = []
    ready: dict[str, float] = {}
    for op in log:
        stream, kind = op[0], op[1]
        start = ready.get(stream, 0.0)
        if kind in ("wait_event", "wait_op") and op[2] is not None:
            start = max(start, times[op[2]][1])
        dur = {"copy": copy_s, "compute": compute_s}.get(kind, op[2] if kind == "gap" else 0.0)
        times.append((start, start + dur))
        ready[stream] = start + dur
    return times


def _violations(log, times) -> list[str]:
    bad = []
    copies = [(i, op[2], op[3]) for i, op in enumerate(log) if op[1] == "copy"]  # (op, slot, layer)
    for i, op in enumerate(log):
        if op[1] != "compute" or op[2] is None:
            continue
        slot, layer = op[2], op[3]
        c0, c1 = times[i]
        done = [(times[k][1], lay) for k, s, lay in copies if s == slot and times[k][1] <= c0]
        if not done or max(done)[1] != layer:
            bad.append(f"layer {layer} computed from slot {slot} before its copy finished")
        for k, s, lay in copies:
            if s == slot and times[k][0] < c1 and times[k][1] > c0 and lay != layer:
                bad.append(f"copy of layer {lay} overwrote slot {slot} while layer {layer} computed")
    return bad


def _run_forwards(monkeypatch, offloaded, num_layers, num_slots, forwards=2, break_wait=None, gap_s=None,
                  prefetch_next=True):
    from distllm.worker.offload import LayerStager

    fake = _FakeCuda()
    fake.install(monkeypatch)
    sched = StagingSchedule(tuple(offloaded), num_slots)
    st = LayerStager(sched, [torch.zeros(4, dtype=torch.uint8) for _ in offloaded], [[] for _ in offloaded],
                     [torch.zeros(4, dtype=torch.uint8) for _ in range(num_slots)], torch.device("cpu"), prefetch_next)
    st.cuda = True  # the CUDA path, on the fakes
    st.copy_stream = torch.cuda.Stream()
    st.copied = [torch.cuda.Event() for _ in range(num_slots)]
    st.released = [torch.cuda.Event() for _ in range(num_slots)]
    st._copy = lambda s, j: _FakeCuda.current.enqueue(("copy", s, offloaded[j]))
    if break_wait == "copied":  # a bug on purpose: compute does not wait for the copy
        st.copied = [_FakeEvent(fake.log) for _ in range(num_slots)]
        for ev in st.copied:
            ev.wait = lambda stream: None
    if break_wait == "released":  # a bug on purpose: copies do not wait for the slot's release
        for ev in st.released:
            ev.wait = lambda stream: None
    pos = {layer: j for j, layer in enumerate(offloaded)}
    for _ in range(forwards):
        st.start()  # DecoderModel's pre-hook: before the embedding, which is inside its forward
        fake.compute.enqueue(("compute", None, "embed"))
        for layer in range(num_layers):
            j = pos.get(layer)
            if j is not None:
                st.before(j)
            fake.compute.enqueue(("compute", sched.slot_of(j) if j is not None else None, layer))
            if j is not None:
                st.after(j)
        fake.compute.enqueue(("compute", None, "logits"))
        if gap_s is not None:  # sampling and the host's work between steps, as busy time
            fake.compute.enqueue(("gap", gap_s))
    return fake.log


@pytest.mark.parametrize("copy_s,compute_s", [(10.0, 1.0), (1.0, 10.0), (3.0, 3.0), (0.0, 1.0)])
@pytest.mark.parametrize("offloaded,num_layers,k", [((1, 3, 5, 7), 8, 2), ((0, 1, 2, 3, 4), 5, 2),
                                                    ((2, 5, 8), 9, 3), ((1, 2), 4, 1), ((3,), 4, 2)])
@pytest.mark.parametrize("prefetch_next", [True, False])
def test_stream_order_never_races(monkeypatch, offloaded, num_layers, k, copy_s, compute_s, prefetch_next):
    log = _run_forwards(monkeypatch, list(offloaded), num_layers, k, forwards=3, gap_s=2.0, prefetch_next=prefetch_next)
    times = _simulate(log, copy_s, compute_s)
    assert _violations(log, times) == []
    ahead = min(k, len(offloaded)) if prefetch_next else 0
    assert sum(op[1] == "copy" for op in log) == 3 * len(offloaded) + ahead


def test_stream_order_overlaps_copies_with_compute(monkeypatch):
    """Slow copies, 8 layers with 4 offloaded (2 slots): the copy stream never idles once the
    forward has started, so a step is about the copies' time, not copies + compute."""
    log = _run_forwards(monkeypatch, [1, 3, 5, 7], 8, 2, forwards=2, gap_s=5.0)
    times = _simulate(log, copy_s=10.0, compute_s=1.0)
    copy_times = sorted(times[i] for i, op in enumerate(log) if op[1] == "copy")
    assert all(b[0] == a[1] for a, b in zip(copy_times, copy_times[1:]))  # back to back, across steps too
    logits_end = [times[i][1] for i, op in enumerate(log) if op[1] == "compute" and op[3] == "logits"]
    # Each step: its 4 copies, then layer 7 and the logits; the host gap between steps is hidden.
    assert logits_end == [4 * 10.0 + 2.0, 8 * 10.0 + 2.0]


@pytest.mark.parametrize("broken", ["copied", "released"])
def test_stream_order_check_catches_a_missing_wait(monkeypatch, broken):
    log = _run_forwards(monkeypatch, [1, 3, 5, 7], 8, 2, break_wait=broken)
    slow_copy, slow_compute = (10.0, 1.0) if broken == "copied" else (1.0, 10.0)
    assert _violations(log, _simulate(log, slow_copy, slow_compute))


def test_engine_generates_through_the_stager_on_cpu(tiny_models, monkeypatch):
    """The whole engine (profile, prefill, decode with a KV cache, several steps) with the
    staging hooks installed, forced on CPU: the same greedy tokens as without offload."""
    from distllm import LLM, SamplingParams

    made: list[CpuOffloader] = []

    def forced(config, device, kv_spec):
        o = CpuOffloader(1e-9, device, num_slots=1)  # the fewest layers: one, through one slot
        made.append(o)
        return o

    prompts = [{"prompt_token_ids": [5, 900, 1200, 77]}, {"prompt_token_ids": list(range(300, 345))}]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    kw = dict(model=tiny_models["qwen3"], device="cpu")
    with LLM(**kw) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    monkeypatch.setattr(off, "make_offloader", forced)
    with LLM(**kw) as llm:
        st = made[0].stager
        calls = []
        real_before = st.before
        st.before = lambda j: (calls.append(j), real_before(j))  # returns a tuple: the hooks must drop it
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert made[0].plan.layers == [1] and len(calls) >= 10  # one staged layer (of 2) per forward
    assert got == ref
