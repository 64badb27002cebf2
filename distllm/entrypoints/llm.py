"""`LLM`: the offline API, with vLLM's names, so a vLLM script runs after changing its import."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from distllm.config import EngineArgs
from distllm.engine.input_processor import PromptType
from distllm.entrypoints.llm_pooling import PoolingMixin
from distllm.engine.llm_engine import LLMEngine
from distllm.outputs import BeamSearchOutput, PoolingRequestOutput, RequestOutput
from distllm.params import BeamSearchParams, PoolingParams, RequestOutputKind, SamplingParams

_VALID_ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) for t in x)


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    return list(prompts)


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported.")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}.")


def normalize_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role'.")
        if m["role"] not in _VALID_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {_VALID_ROLES}, got {m['role']!r}.")
        out.append({**m, "content": _message_text(m.get("content"), f"messages[{i}]")})
    return out


class LLM(PoolingMixin):
    """An LLM for offline inference: `LLM(model=...)`; no model = the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        kwargs.pop("disable_log_stats", None)
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    # ---- plumbing ------------------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def shutdown(self) -> None:
        if getattr(self, "llm_engine", None) is not None:
            self.llm_engine.shutdown()
            self.llm_engine = None
        import gc

        gc.collect()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise RuntimeError("this LLM was shut down; build a new one.")
        return self.llm_engine

    def _add_all(self, prompts: list[PromptType], params: list[Any], priority: list[int] | None) -> list[str]:
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} parameter objects for {len(prompts)} prompts; pass one, or one per prompt.")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts.")
        engine = self._engine()
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = str(next(self._counter))
                engine.add_request(rid, p, sp, priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt fails the call before any work is done
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool, desc: str) -> list[Any]:
        engine = self._engine()
        wanted = set(ids)
        done: dict[str, Any] = {}
        bar = tqdm(total=len(ids), desc=desc, dynamic_ncols=True, disable=not use_tqdm)
        n_in = n_out = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished or out.request_id not in wanted:
                        continue
                    done[out.request_id] = out
                    if isinstance(out, RequestOutput):
                        n_in += len(out.prompt_token_ids)
                        n_out += sum(len(o.token_ids) for o in out.outputs)
                    bar.update(1)
                    if use_tqdm:
                        rate = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"est. speed input: {n_in / rate:.2f} toks/s, output: {n_out / rate:.2f} toks/s")
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids if i in done]

    # ---- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        self._require_runner("generate", "generate")
        plist = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(plist)
        # As in vLLM: offline generation only wants each request's final output, which spares
        # building a cumulative RequestOutput per request per step.
        final: dict[int, SamplingParams] = {}
        for p in params:
            if isinstance(p, SamplingParams) and id(p) not in final:
                final[id(p)] = p.clone()
                final[id(p)].output_kind = RequestOutputKind.FINAL_ONLY
        params = [final.get(id(p), p) for p in params]
        ids = self._add_all(plist, params, priority)
        return self._run(ids, use_tqdm, "Processed prompts")

    def _render_chat(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        tok = self.get_tokenizer()
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be True.")
        if chat_template is None and getattr(tok, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=... to chat().")
        # transformers renders the template in a sandboxed Jinja environment.
        text = tok.apply_chat_template(
            normalize_conversation(conversation),
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        self._require_runner("generate", "chat")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self._render_chat(c, chat_template, add_generation_prompt, continue_final_message, chat_template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        from distllm.entrypoints.beam_search import run_beam_search

        self._require_runner("generate", "beam_search")
        return run_beam_search(self, _as_prompt_list(prompts), params, use_tqdm)

    # ---- pooling -------------------------------------------------------------------------------

    def _require_runner(self, runner: str, method: str) -> None:
        have = self._engine().model_config.runner
        if have != runner:
            raise ValueError(
                f"LLM.{method}() needs a model with runner='{runner}', but this one runs with runner='{have}'. "
                f"Build the LLM with runner='{runner}' and a model that supports it."
            )

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        pooling_task: str = "encode",
    ) -> list[PoolingRequestOutput]:
        self._require_runner("pooling", "encode")
        self._check_task(pooling_task, "encode")
        plist = _as_prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        params = list(pooling_params) if isinstance(pooling_params, (list, tuple)) else [pooling_params] * len(plist)
        params = [p.clone() for p in params]
        for p in params:
            p.task = pooling_task
        ids = self._add_all(plist, params, None)
        return self._run(ids, use_tqdm, "Processed prompts")
