"""`distllm bench serve`: load a running OpenAI-compatible server and report latency percentiles.

Requests arrive as a Poisson process at --request-rate (or as fast as --max-concurrency allows),
each a streamed /v1/completions of --input-len random prompt tokens and exactly --output-len
generated tokens (ignore_eos). Reports request and token throughput, TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p90, p99) and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def register(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("serve", help="load a running server (Poisson arrivals or fixed concurrency)")
    p.add_argument("--base-url", type=str, default="http://127.0.0.1:8000")
    p.add_argument("--model", type=str, default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", type=str, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-low", type=int, default=1000, help="random prompt token ids are drawn from "
                   "[vocab-low, vocab-high)")
    p.add_argument("--vocab-high", type=int, default=20000)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--result-json", type=str, default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_serve)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    res = RequestResult(prompt_tokens=len(body["prompt"]))
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                if any(c.get("text") for c in obj.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens received"
    except Exception as e:  # noqa: BLE001 - counted as a failure
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=max(100, (args.max_concurrency or 0) + 10), max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get(f"{base}/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = [[rng.randrange(args.vocab_low, args.vocab_high) for _ in range(args.input_len)]
                   for _ in range(args.num_prompts)]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        url = f"{base}/v1/completions"

        async def limited(body: dict[str, Any]) -> RequestResult:
            if sem is None:
                return await _one(client, url, body, headers)
            async with sem:
                return await _one(client, url, body, headers)

        tasks = []
        t_start = time.perf_counter()
        for p in prompts:
            body = {"model": model, "prompt": p, "max_tokens": args.output_len, "ignore_eos": True,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_start
    return summarize(results, duration, args)


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    summary: dict[str, Any] = {
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "input_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2el", [r.e2e for r in ok])):
        summary[f"mean_{name}_ms"] = 1000 * sum(xs) / len(xs) if xs else float("nan")
        for q in (50, 90, 99):
            summary[f"p{q}_{name}_ms"] = 1000 * _pct(xs, q)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Request rate (req/s)", s["request_rate"]), ("Max concurrency", s["max_concurrency"]),
            ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", s["duration_s"]), ("Total input tokens", s["input_tokens"]),
            ("Total generated tokens", s["output_tokens"]), ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"])]
    for k, v in rows:
        print(f"{k:<40}{v:>14.2f}" if isinstance(v, float) else f"{k:<40}{str(v):>14}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print("-" * 25 + f" {title} " + "-" * 25)
        for stat in ("mean", "p50", "p90", "p99"):
            print(f"{stat.capitalize() + ' ' + name.upper() + ' (ms)':<40}{s[f'{stat}_{name}_ms']:>14.2f}")
    if s["errors"]:
        print("Errors:", *s["errors"], sep="\n  ")
    print("=" * 66)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    summary = asyncio.run(run_benchmark(args))
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1
