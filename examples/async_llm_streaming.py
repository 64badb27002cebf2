"""Stream tokens from AsyncLLMEngine: several prompts at once in one event loop.

    python examples/async_llm_streaming.py [--model PATH] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio

from distllm.config import EngineArgs
from distllm.engine.async_llm_engine import AsyncLLMEngine
from distllm.params import RequestOutputKind, SamplingParams

PROMPTS = ["The capital of France is", "A haiku about the sea:", "def fibonacci(n):"]


async def stream_one(engine: AsyncLLMEngine, i: int, prompt: str, params: SamplingParams) -> str:
    text = ""
    async for out in engine.generate(prompt, params, request_id=f"req-{i}"):
        delta = out.outputs[0].text  # DELTA: only what is new since the last output
        text += delta
        print(f"[{i}] +{delta!r}", flush=True)
    return text


async def main(args: argparse.Namespace) -> None:
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=args.model, device=args.device))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, output_kind=RequestOutputKind.DELTA)
    try:
        texts = await asyncio.gather(*(stream_one(engine, i, p, params) for i, p in enumerate(PROMPTS)))
        for p, t in zip(PROMPTS, texts):
            print(f"{p!r} -> {t!r}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=16)
    asyncio.run(main(ap.parse_args()))
