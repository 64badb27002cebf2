"""/v1/completions, and the plumbing every route shares (OpenAIServing)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Sequence

from distllm.engine.async_llm_engine import AsyncLLMEngine, RequestStream
from distllm.entrypoints.server.errors import APIError
from distllm.entrypoints.server.protocol import CompletionRequest, random_id
from distllm.outputs import RequestOutput
from distllm.params import SamplingParams


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several request streams as (stream index, output); closing aborts the rest."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def until_disconnect(request: Any) -> None:
    """Returns when the HTTP client goes away (ASGI http.disconnect)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            return


async def run_unless_disconnected(request: Any, coro: Awaitable[Any]) -> Any:
    """Await `coro`, cancelling it (so its requests are aborted) if the client disconnects."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(until_disconnect(request)) if request is not None else None
    try:
        waiters = {work} | ({watch} if watch else set())
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            try:
                await work
            except BaseException:  # noqa: BLE001
                pass
            raise APIError("client disconnected", 499)
        return work.result()
    finally:
        if watch is not None:
            watch.cancel()
        if not work.done():
            work.cancel()


class OpenAIServing:
    """What every route needs: the engine, the served names, tokenization and length checks."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], model_path: str | None = None):
        self.engine = engine
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.model_path = model_path
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len
        self.runner = engine.model_config.runner
        self._defaults: SamplingParams | None = None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", 404, param="model")

    def default_sampling_params(self) -> SamplingParams:
        if self._defaults is None:
            self._defaults = self.engine.get_default_sampling_params()
        return self._defaults

    def require_generate(self, route: str) -> None:
        if self.runner != "generate":
            raise APIError(
                f"{route} needs a generative model; this server's model runs with runner='{self.runner}'.", 400
            )

    def check_length(self, prompt_len: int, max_tokens: int | None, where: str = "prompt") -> None:
        if prompt_len >= self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {where} has "
                f"{prompt_len} tokens; please reduce its length.", 400, param="prompt" if where == "prompt" else "messages",
            )
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or the completion (max_tokens).", 400, param="max_tokens",
            )

    def tokenize_prompts(self, prompt: Any, add_special_tokens: bool = True) -> list[tuple[str | None, list[int]]]:
        """OpenAI prompt forms: str, [str], [int], [[int]] -> [(text or None, token ids)]."""
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise APIError("prompt must be a non-empty string, list of strings, or list of token ids.", 400, "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt cannot be empty.", 400, "prompt")
                out.append((p, self.tokenizer.encode(p, add_special_tokens=add_special_tokens)))
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                out.append((None, list(p)))
            else:
                raise APIError("prompt must be a non-empty string, list of strings, or list of token ids.", 400,
                               "prompt")
        return out

    async def start_streams(
        self, base_id: str, prompts: list[dict[str, Any]], params: Any, priority: int, pooling: bool = False
    ) -> list[RequestStream]:
        """Queue every prompt; a bad one raises (ValueError -> 400) and aborts those already queued."""
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                ps = params[i] if isinstance(params, list) else params
                streams.append(await self.engine.add_request(rid, p, ps, priority=priority))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def collect_final(self, streams: list[RequestStream]) -> list[Any]:
        finals: list[Any] = [None] * len(streams)
        async for i, out in merge_streams(streams):
            if out.finished:
                finals[i] = out
        return finals


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]] | None, num: int, offset: int = 0
) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, d in zip(token_ids, logprobs):
        lp = d.get(tid) if d else None
        tok = lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])
        tokens.append(tok)
        token_lps.append(max(lp.logprob, -9999.0) if lp is not None else None)
        top: dict[str, float] = {}
        for t, l in sorted((d or {}).items(), key=lambda kv: kv[1].rank or 0):
            if num and (l.rank is None or l.rank <= num) or t == tid:
                text = l.decoded_token if l.decoded_token is not None else tokenizer.decode([t])
                top[text] = max(l.logprob, -9999.0)
        tops.append(top if num else None)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest, raw_request: Any = None) -> Any:
        self.check_model(req.model)
        self.require_generate("/v1/completions")
        sp = req.to_sampling_params(self.default_sampling_params())
        prompts = self.tokenize_prompts(req.prompt)
        for _, ids in prompts:
            n_ids = len(ids) if sp.truncate_prompt_tokens is None else min(len(ids), sp.truncate_prompt_tokens)
            self.check_length(n_ids, sp.max_tokens)
        request_id = random_id("cmpl")
        created = int(time.time())
        engine_prompts = [{"prompt": t, "prompt_token_ids": ids} if t is not None else {"prompt_token_ids": ids}
                          for t, ids in prompts]
        streams = await self.start_streams(request_id, engine_prompts, sp, req.priority)
        if req.stream:
            return self._stream(req, sp, request_id, created, prompts, streams)
        finals = await run_unless_disconnected(raw_request, self.collect_final(streams))
        return self._response(req, sp, request_id, created, prompts, finals)

    def _choice_text(self, req: CompletionRequest, prompt_text: str | None, ids: list[int], text: str) -> str:
        if req.echo:
            return (prompt_text if prompt_text is not None else self.tokenizer.decode(ids)) + text
        return text

    def _response(self, req, sp, request_id, created, prompts, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        n_prompt = n_gen = 0
        for i, out in enumerate(finals):
            n_prompt += len(out.prompt_token_ids)
            for o in out.outputs:
                n_gen += len(o.token_ids)
                choices.append({
                    "index": i * sp.n + o.index,
                    "text": self._choice_text(req, prompts[i][0], prompts[i][1], o.text),
                    "logprobs": completion_logprobs(self.tokenizer, o.token_ids, o.logprobs, req.logprobs or 0),
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                })
        choices.sort(key=lambda c: c["index"])
        return {
            "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
        }

    async def _stream(self, req, sp, request_id, created, prompts, streams) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_prompt = sum(len(ids) for _, ids in prompts)
        n_gen = 0
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, out in merge_streams(streams):
                for o in out.outputs:
                    idx = i * sp.n + o.index
                    text = o.text
                    if req.echo and idx not in echoed:
                        echoed.add(idx)
                        text = self._choice_text(req, prompts[i][0], prompts[i][1], text)
                    n_gen += len(o.token_ids)
                    lp = completion_logprobs(self.tokenizer, o.token_ids, o.logprobs, req.logprobs or 0,
                                             offsets.get(idx, 0))
                    if lp is not None:
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp["tokens"])
                    if not text and not o.token_ids and o.finish_reason is None:
                        continue
                    yield sse({
                        "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": o.finish_reason,
                                     "stop_reason": o.stop_reason}],
                    })
            if include_usage:
                yield sse({
                    "id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
                })
        except (ValueError, RuntimeError) as e:
            from distllm.entrypoints.server.errors import error_body

            yield sse(error_body(str(e), 503 if "dead" in str(e) else 400))
        yield SSE_DONE
