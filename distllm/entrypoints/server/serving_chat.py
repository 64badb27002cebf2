"""/v1/chat/completions: messages -> the model's chat template -> generation."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from distllm.entrypoints.llm import normalize_conversation
from distllm.entrypoints.server.errors import APIError, error_body
from distllm.entrypoints.server.protocol import ChatCompletionRequest, random_id
from distllm.entrypoints.server.serving_completion import (
    SSE_DONE,
    OpenAIServing,
    merge_streams,
    run_unless_disconnected,
    sse,
)


def render_chat(
    tokenizer: Any,
    messages: Any,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """The same rendering as LLM.chat: validate, apply the chat template, tokenize without specials."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template in the request.")
    conversation = normalize_conversation(messages)
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
    except ValueError:
        raise
    except Exception as e:  # jinja2 errors: the template or the messages are at fault
        raise ValueError(f"the chat template could not be rendered: {e}") from e
    return text, tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]] | None,
                  top: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []

    def entry(t: int, l: Any) -> dict[str, Any]:
        tok = l.decoded_token if l is not None and l.decoded_token is not None else tokenizer.decode([t])
        return {"token": tok, "logprob": max(l.logprob, -9999.0) if l is not None else None,
                "bytes": list(tok.encode("utf-8", errors="replace"))}

    for tid, d in zip(token_ids, logprobs):
        d = d or {}
        e = entry(tid, d.get(tid))
        ranked = sorted(((t, l) for t, l in d.items() if l.rank is not None and l.rank <= top),
                        key=lambda kv: kv[1].rank)
        e["top_logprobs"] = [entry(t, l) for t, l in ranked[:top]] if top else []
        content.append(e)
    return {"content": content}


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Any = None) -> Any:
        self.check_model(req.model)
        self.require_generate("/v1/chat/completions")
        sp = req.to_sampling_params(self.default_sampling_params())
        try:
            text, ids = render_chat(self.tokenizer, req.messages, req.chat_template, req.add_generation_prompt,
                                    req.continue_final_message, req.chat_template_kwargs)
        except ValueError as e:
            raise APIError(str(e), 400, param="messages") from e
        n_ids = len(ids) if sp.truncate_prompt_tokens is None else min(len(ids), sp.truncate_prompt_tokens)
        self.check_length(n_ids, sp.max_tokens, where="messages")
        request_id = random_id("chatcmpl")
        created = int(time.time())
        streams = await self.start_streams(request_id, [{"prompt": text, "prompt_token_ids": ids}], sp, req.priority)
        echo = ""
        if req.echo and req.messages and req.messages[-1].get("role") == "assistant":
            echo = normalize_conversation(req.messages[-1:])[0]["content"]
        top = req.top_logprobs or 0
        if req.stream:
            return self._stream(req, request_id, created, streams, len(ids), echo, top)
        finals = await run_unless_disconnected(raw_request, self.collect_final(streams))
        out = finals[0]
        choices = []
        n_gen = 0
        for o in out.outputs:
            n_gen += len(o.token_ids)
            choices.append({
                "index": o.index,
                "message": {"role": "assistant", "content": echo + o.text, "tool_calls": []},
                "logprobs": chat_logprobs(self.tokenizer, o.token_ids, o.logprobs, top) if req.logprobs else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            })
        n_prompt = len(out.prompt_token_ids)
        return {
            "id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
        }

    async def _stream(self, req, request_id, created, streams, n_prompt, echo, top) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_gen = 0
        started: set[int] = set()

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name, "choices": choices, **extra})

        try:
            for i in range(req.n):
                started.add(i)
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                              "finish_reason": None}])
            async for _, out in merge_streams(streams):
                for o in out.outputs:
                    n_gen += len(o.token_ids)
                    if not o.text and not o.token_ids and o.finish_reason is None:
                        continue
                    lp = chat_logprobs(self.tokenizer, o.token_ids, o.logprobs, top) if req.logprobs else None
                    delta = {"content": o.text} if o.text or o.finish_reason is None else {}
                    yield chunk([{"index": o.index, "delta": delta, "logprobs": lp,
                                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}])
            if include_usage:
                yield chunk([], usage={"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                       "total_tokens": n_prompt + n_gen})
        except (ValueError, RuntimeError) as e:
            yield sse(error_body(str(e), 503 if "dead" in str(e) else 400))
        yield SSE_DONE
