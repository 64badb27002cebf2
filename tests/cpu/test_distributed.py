"""Tensor parallelism over gloo with the ``mp`` and ``ray`` executors; liveness; the launcher.

One local Ray cluster (two CPUs, loopback, token auth as Ray defaults) is shared by every Ray
test in this module; ``mp`` tests spawn their own worker processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from distllm.executor.base import EngineDeadError

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3,"]
MAX_TOKENS = 8


def _sp():
    from distllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _llm(folder: str, tp: int, backend: str | None = None, **kw):
    from distllm import LLM

    return LLM(
        model=folder, tensor_parallel_size=tp, distributed_executor_backend=backend, device="cpu",
        max_num_seqs=8, max_model_len=256, kv_cache_memory_bytes=32 << 20, **kw,
    )


def _token_ids(llm) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, _sp(), use_tqdm=False)]


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:  # pragma: no cover
        return os.path.exists(f"/proc/{pid}")
    except Exception:  # noqa: BLE001 - gone between the two calls
        return False


def _wait_gone(pids, timeout=5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _pid_alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _pid_alive(p)]


@pytest.fixture(scope="module")
def reference(tiny_models) -> dict[str, list[list[int]]]:
    """tp=1 greedy tokens per model (in-process executor)."""
    out = {}
    for kind in ("llama", "qwen3"):
        llm = _llm(tiny_models[kind], 1)
        out[kind] = _token_ids(llm)
        llm.shutdown()
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from distllm.executor.ray import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


# ---- executor selection --------------------------------------------------------------------


def test_ray_missing_falls_back_to_mp(tiny_models, monkeypatch, caplog):
    from distllm.config import EngineArgs
    from distllm.executor import base
    from distllm.executor.mp import MPExecutor

    cfg = EngineArgs(model=tiny_models["llama"], tensor_parallel_size=2, device="cpu").create_engine_config()
    assert cfg.parallel_config.distributed_executor_backend == "ray"  # the default for tp > 1
    monkeypatch.setattr(base, "_ray_installed", lambda: False)
    with caplog.at_level("WARNING"):
        ex = base.create_executor(cfg)
    assert isinstance(ex, MPExecutor)
    assert cfg.parallel_config.distributed_executor_backend == "mp"
    assert "Ray is not installed" in caplog.text


# ---- mp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_mp_tp2_matches_tp1(tiny_models, reference, kind):
    llm = _llm(tiny_models[kind], 2, "mp")
    try:
        assert _token_ids(llm) == reference[kind]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def one_kv_head_llama(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny Llama with 1 KV head: at tp=2 the KV head is replicated, not split."""
    import torch
    import transformers

    folder = str(tmp_path_factory.mktemp("llama_kv1"))
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_mp_tp2_replicated_kv_head(one_kv_head_llama):
    ref = _llm(one_kv_head_llama, 1)
    want = _token_ids(ref)
    ref.shutdown()
    llm = _llm(one_kv_head_llama, 2, "mp")
    try:
        assert _token_ids(llm) == want
    finally:
        llm.shutdown()


def test_mp_two_engines_and_bad_frames(tiny_models, reference):
    """Two tp=2 engines alive at once don't collide; tampered, replayed and pickled frames sent
    on a running engine's plan and result sockets are dropped and the engine carries on."""
    import pickle

    import zmq

    from distllm.distributed.transport import KIND_PLAN, make_frames

    a = _llm(tiny_models["llama"], 2, "mp")
    b = _llm(tiny_models["llama"], 2, "mp")
    try:
        ea, eb = a.llm_engine.executor, b.llm_engine.executor
        assert ea.transport.plan_addr != eb.transport.plan_addr
        assert ea.transport.result_addr != eb.transport.result_addr
        assert ea.transport.hmac_key != eb.transport.hmac_key
        assert set(ea.worker_pids.values()).isdisjoint(eb.worker_pids.values())

        ch = ea.channel
        good = make_frames(ea.transport.hmac_key, KIND_PLAN, 10**9, -1, 10**6, b"\x90")
        tampered = [good[0], b"\x91\x00", good[2]]  # payload changed after signing
        wrong_key = make_frames(b"k" * 32, KIND_PLAN, 10**9, -1, 10**6, b"\x90")
        pickled = [good[0], pickle.dumps({"x": 1}), b"\x00" * 32]
        replay = make_frames(ea.transport.hmac_key, KIND_PLAN, 1, -1, 0, b"\x90")  # stale seq
        for frames in (tampered, wrong_key, pickled, replay, [b"junk"]):
            ch._pub.send_multipart(frames)  # straight onto the plan socket, to every rank
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)  # flushed once the (async) connect is up
        push.connect(ea.transport.result_addr)
        for frames in (tampered, pickled, [b"junk"]):
            push.send_multipart(frames)
        push.close()
        time.sleep(0.2)

        assert _token_ids(a) == reference["llama"]
        assert _token_ids(b) == reference["llama"]
        assert ch.num_dropped >= 1  # the result-socket junk was dropped by the driver
        a.llm_engine.executor.check_health()
    finally:
        a.shutdown()
        b.shutdown()
    assert _wait_gone(list(ea.worker_pids.values()) + list(eb.worker_pids.values())) == []


def _kill_mid_generation(llm, kill) -> float:
    """Start a long generation, kill a worker once it runs; return seconds to EngineDeadError."""
    from distllm import SamplingParams

    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    t_kill = [None]

    def do_kill():
        t_kill[0] = time.monotonic()
        kill()

    timer = threading.Timer(1.0, do_kill)
    timer.start()
    try:
        with pytest.raises(EngineDeadError) as ei:
            for _ in range(50):
                llm.generate(PROMPTS, sp, use_tqdm=False)
        t_dead = time.monotonic()
    finally:
        timer.cancel()
    assert t_kill[0] is not None, "the generation ended before the kill"
    assert "rank" in str(ei.value)
    with pytest.raises(EngineDeadError):
        llm.generate(PROMPTS[:1], _sp(), use_tqdm=False)
    assert eng.get_num_unfinished_requests() == 0
    return t_dead - t_kill[0]


def test_mp_worker_killed(tiny_models):
    llm = _llm(tiny_models["llama"], 2, "mp")
    ex = llm.llm_engine.executor
    pids = list(ex.worker_pids.values())
    try:
        took = _kill_mid_generation(llm, lambda: os.kill(pids[1], signal.SIGKILL))
        assert took < 5.0
    finally:
        llm.shutdown()
    assert _wait_gone(pids) == []
    assert not [p for p in ex.procs if p.is_alive()]


# ---- ray --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_ray_tp2_matches_tp1(ray_cluster, tiny_models, reference, kind):
    llm = _llm(tiny_models[kind], 2, "ray")
    try:
        ex = llm.llm_engine.executor
        assert len(ex.actors) == 2 and not ex.owns_cluster
        assert _token_ids(llm) == reference[kind]
        pids = list(ex.worker_pids.values())
    finally:
        llm.shutdown()
    assert _wait_gone(pids) == []
    from ray.util.placement_group import placement_group_table

    assert all(v["state"] == "REMOVED" for v in placement_group_table().values())


def test_ray_worker_killed(ray_cluster, tiny_models):
    ray = ray_cluster
    llm = _llm(tiny_models["llama"], 2, "ray")
    ex = llm.llm_engine.executor
    pids = list(ex.worker_pids.values())
    victim = ex.actors[1]
    try:
        took = _kill_mid_generation(llm, lambda: ray.kill(victim, no_restart=True))
        assert took < 5.0
    finally:
        llm.shutdown()
    assert _wait_gone(pids) == []


def test_launch_generate_through_ray(ray_cluster, tiny_models, capsys):
    from distllm.entrypoints.cli import main

    rc = main([
        "launch", "--tp", "2", "--model", tiny_models["llama"], "generate", "Hello, my name is",
        "--max-tokens", "4", "--temperature", "0", "--device", "cpu", "--max-model-len", "256",
    ])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip()


def test_launch_not_enough_resources(ray_cluster, tiny_models, capsys):
    from distllm.entrypoints.cli import main

    rc = main(["launch", "--tp", "64", "--model", tiny_models["llama"], "generate", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "64" in err and "CPU" in err
