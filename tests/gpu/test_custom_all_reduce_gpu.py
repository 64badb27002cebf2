"""Custom all-reduce on GPUs (device machines only, >= 2 GPUs with NVLink): against NCCL,
eager and replayed in a CUDA graph, and end to end (TP=2 greedy decode against TP=1).

Every check runs in world-size processes (torch.multiprocessing spawn, NCCL group); a failed
assertion in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD_SIZES = [w for w in (2, 4) if w <= NUM_GPUS]
# bytes in bf16: 1 KB .. 2 MB, and element counts that are odd or leave a partial tile.
SIZES = [512, 4096, 32 << 10, 256 << 10, 1 << 20, 1, 3, 1031, 70001]


def _spawn(fn, world: int, tmp_path, *args) -> None:
    init_file = str(tmp_path / f"init_{fn.__name__}_{world}")
    mp.spawn(fn, args=(world, init_file, *args), nprocs=world, join=True)


def _setup(rank: int, world: int, init_file: str):
    from distllm.distributed.custom_all_reduce import init_custom_all_reduce

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    car = init_custom_all_reduce(dist.group.WORLD, rank, world, dev)
    assert car is not None, "custom all-reduce did not come up: see the 'custom all-reduce off' log line"
    car.max_spin = 1 << 26  # a broken barrier fails the test (errors() > 0) instead of hanging it
    return car, dev


def _inputs(n: int, dtype: torch.dtype, rank: int, seed: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(random normal, small integers: exact sums in any order) for this rank."""
    g = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
    x = torch.randn(n, generator=g, device=dev).to(dtype)
    i = torch.randint(-8, 9, (n,), generator=g, device=dev).to(dtype)
    return x, i


def _nccl(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    dist.all_reduce(y)
    return y


def _check(got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    assert not got.isnan().any(), what
    if exact:
        assert torch.equal(got, want), what
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=what)
    else:  # NCCL may round between hops; ours sums in fp32 and rounds once
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02, msg=what)


def _same_on_every_rank(t: torch.Tensor, world: int, what: str) -> None:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    for p in parts[1:]:
        assert torch.equal(p, parts[0]), f"{what}: ranks disagree"


def _eager_worker(rank: int, world: int, init_file: str) -> None:
    from distllm.distributed.custom_all_reduce import BUFFER_BYTES

    car, dev = _setup(rank, world, init_file)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for n in SIZES:
                if n * dtype.itemsize > BUFFER_BYTES:
                    continue
                x, i = _inputs(n, dtype, rank, seed=n, dev=dev)
                what = f"{world} ranks, {n} x {dtype}"
                want_x, want_i = _nccl(x), _nccl(i)
                got_x = car.all_reduce(x.clone())
                out = torch.empty_like(i)
                got_i = car.all_reduce(i, out=out)
                assert got_i is out
                _check(got_x, want_x, False, what)
                _check(got_i, want_i, True, what + " (integers)")
                _same_on_every_rank(got_x, world, what)
        torch.cuda.synchronize()
        assert car.errors() == 0
    finally:
        dist.destroy_process_group()


def _graph_worker(rank: int, world: int, init_file: str) -> None:
    car, dev = _setup(rank, world, init_file)
    try:
        # Three sizes like a decode step's mix (8 KB, 64 KB, 2 MB bf16) and one fp32, each
        # reduced in place after a copy, all in one graph, so slot and flag reuse across launches of
        # different grids is exercised on every replay.
        specs = [(4096, torch.bfloat16), (32 << 10, torch.bfloat16), (1 << 20, torch.bfloat16), (3000, torch.float32)]
        ins = [torch.zeros(n, dtype=dt, device=dev) for n, dt in specs]
        outs = [torch.zeros_like(t) for t in ins]
        for t in ins:  # compile (and warm) outside the capture
            car.all_reduce(t.clone())
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for t, o in zip(ins, outs):
                o.copy_(t)
                car.all_reduce(o)
        for it in range(20):
            for k, ((n, dt), t) in enumerate(zip(specs, ins)):
                x, i = _inputs(n, dt, rank, seed=100 + it * 10 + k, dev=dev)
                t.copy_(i if it % 2 else x)
            g.replay()
            if it % 3 == 0:  # an eager call between replays shares the slots and the sequence number
                e = torch.ones(777, dtype=torch.bfloat16, device=dev) * (rank + 1)
                _check(car.all_reduce(e), torch.full_like(e, world * (world + 1) / 2), True, "eager between replays")
            for (n, dt), t, o in zip(specs, ins, outs):
                what = f"replay {it}, {world} ranks, {n} x {dt}"
                _check(o, _nccl(t), it % 2 == 1, what)
                _same_on_every_rank(o, world, what)
        torch.cuda.synchronize()
        assert car.errors() == 0
    finally:
        dist.destroy_process_group()


def _fused_norm_worker(rank: int, world: int, init_file: str, ll: bool = False) -> None:
    """all_reduce_add_rms_norm against the custom all-reduce then the Triton fused add + norm,
    eager and replayed in a CUDA graph mixed with plain all-reduces (shared sequence number).
    ``ll``: with the flag-in-word kernel on, which takes the 1- and 7-row calls (64 and 256
    rows are past its slots and take the flag kernel, in the same graph)."""
    from distllm.distributed.custom_all_reduce import ENV_LL
    from distllm.ops.triton_norm import fused_add_rms_norm, rms_norm

    os.environ[ENV_LL] = "1" if ll else "0"
    car, dev = _setup(rank, world, init_file)
    try:
        assert car.use_ll is ll
        h = 4096
        # The norm weight is the same on every rank, as in the model (a replicated parameter).
        w = torch.rand(h, device=dev, dtype=torch.bfloat16, generator=torch.Generator(device=dev).manual_seed(7)) + 0.5
        for rows in (1, 7, 256):
            x, _ = _inputs(rows * h, torch.bfloat16, rank, seed=rows, dev=dev)
            x = x.view(rows, h)
            res = torch.randn(rows, h, device=dev, dtype=torch.bfloat16, generator=torch.Generator(device=dev).manual_seed(rows))
            assert car.should_use_fused_norm(x, res, w)
            out, res_out = car.all_reduce_add_rms_norm(x, res, w, 1e-5)
            want_out, want_res = fused_add_rms_norm(car.all_reduce(x.clone()), res, w, 1e-5)
            what = f"{world} ranks, {rows} rows"
            assert torch.equal(res_out, want_res), what
            assert (out == want_out).float().mean() > 0.97, what
            torch.testing.assert_close(out.float(), want_out.float(), atol=0.05, rtol=0.02, msg=what)
            _same_on_every_rank(out, world, what)
            # No residual (the first layer's norm of the embedding's sum): the sum and its norm.
            assert car.should_use_fused_norm(x, None, w)
            out, res_out = car.all_reduce_add_rms_norm(x, None, w, 1e-5)
            summed = car.all_reduce(x.clone())
            assert torch.equal(res_out, summed), what + ", no residual"
            torch.testing.assert_close(out.float(), rms_norm(summed, w, 1e-5).float(), atol=0.05, rtol=0.02,
                                       msg=what + ", no residual")
            _same_on_every_rank(out, world, what)
        # In a graph: fused, plain, fused (1 and 64 rows), replayed with new inputs.
        xa, xb = torch.zeros(1, h, device=dev, dtype=torch.bfloat16), torch.zeros(64, h, device=dev, dtype=torch.bfloat16)
        ra, rb = torch.zeros_like(xa), torch.zeros_like(xb)
        plain = torch.zeros(3000, device=dev, dtype=torch.bfloat16)
        plain_out = torch.zeros_like(plain)
        car.all_reduce_add_rms_norm(xa, ra, w, 1e-5)
        car.all_reduce_add_rms_norm(xb, rb, w, 1e-5)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            oa, _ = car.all_reduce_add_rms_norm(xa, ra, w, 1e-5)
            plain_out.copy_(plain)
            car.all_reduce(plain_out)
            ob, rob = car.all_reduce_add_rms_norm(xb, rb, w, 1e-5)
        for it in range(8):
            for t, k in ((xa, 1), (xb, 2), (ra, 3), (rb, 4), (plain, 5)):
                t.copy_(_inputs(t.numel(), torch.bfloat16, rank, seed=1000 + it * 10 + k, dev=dev)[1].view_as(t))
            g.replay()
            wa, _ = fused_add_rms_norm(_nccl(xa), ra, w, 1e-5)
            wb, wrb = fused_add_rms_norm(_nccl(xb), rb, w, 1e-5)
            what = f"replay {it}, {world} ranks"
            _check(plain_out, _nccl(plain), True, what + " (plain)")
            assert torch.equal(rob, wrb), what
            torch.testing.assert_close(oa.float(), wa.float(), atol=0.05, rtol=0.02, msg=what)
            torch.testing.assert_close(ob.float(), wb.float(), atol=0.05, rtol=0.02, msg=what)
        torch.cuda.synchronize()
        assert car.errors() == 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ll", [False, True], ids=["flag-kernel", "ll"])
@pytest.mark.parametrize("world", WORLD_SIZES or [2])
def test_fused_all_reduce_add_rms_norm(world, ll, tmp_path):
    if NUM_GPUS < world:
        pytest.skip(f"needs {world} GPUs, have {NUM_GPUS}")
    _spawn(_fused_norm_worker, world, tmp_path, ll)


@pytest.mark.parametrize("world", WORLD_SIZES or [2])
def test_custom_all_reduce_eager_matches_nccl(world, tmp_path):
    if NUM_GPUS < world:
        pytest.skip(f"needs {world} GPUs, have {NUM_GPUS}")
    _spawn(_eager_worker, world, tmp_path)


@pytest.mark.parametrize("world", WORLD_SIZES or [2])
def test_custom_all_reduce_cuda_graph_replays(world, tmp_path):
    if NUM_GPUS < world:
        pytest.skip(f"needs {world} GPUs, have {NUM_GPUS}")
    _spawn(_graph_worker, world, tmp_path)


# --- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from test_tp_gpu import save_random_llama

    return save_random_llama(str(tmp_path_factory.mktemp("llama_2048_car")))


@pytest.fixture(scope="module")
def tp1_reference(model_dir):
    if NUM_GPUS < 2:
        pytest.skip("needs >= 2 GPUs")
    from test_tp_gpu import _run

    return _run(model_dir, 1, None)


@pytest.mark.parametrize("eager,ll", [(False, False), (True, False), (False, True)],
                         ids=["cuda-graphs", "eager", "cuda-graphs-ll"])
def test_tp2_with_custom_all_reduce_matches_tp1(model_dir, tp1_reference, eager, ll, capfd, monkeypatch):
    from distllm import LLM, SamplingParams
    from distllm.distributed.custom_all_reduce import ENV_DISABLE, ENV_ENABLE, ENV_LL
    from test_tp_gpu import MAX_TOKENS, PROMPTS

    monkeypatch.delenv(ENV_DISABLE, raising=False)
    monkeypatch.delenv(ENV_ENABLE, raising=False)  # on by default
    monkeypatch.setenv(ENV_LL, "1" if ll else "0")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    llm = LLM(model=model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", device="cuda",
              dtype="bfloat16", num_gpu_blocks_override=512, max_model_len=1024, max_num_seqs=8,
              enforce_eager=eager)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()
    log = capfd.readouterr().err
    assert "custom all-reduce on" in log, log[-3000:]
    assert ("flag in every word (LL)" in log) is ll, log[-3000:]
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outs]
    ref_ids, ref_lps = tp1_reference
    print(f"tp=2 custom all-reduce ({'eager' if eager else 'graphs'}): ref {ref_ids}\n got {ids}")
    for r, o in zip(ref_ids, ids):
        assert r[0] == o[0]
        agree = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
        assert agree >= MAX_TOKENS // 2, (r, o)
    for a, b in zip(ref_lps, lps):
        assert abs(a - b) < 0.1, (ref_lps, lps)
