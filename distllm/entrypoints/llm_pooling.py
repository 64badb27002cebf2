"""`LLM.embed`, `classify`, `score`, `reward` (vLLM's signatures and output classes), as a mixin.

`LLM` provides `_require_runner`, `_engine`, `_add_all`, `_run` and `get_tokenizer`; everything here
goes through the same engine, scheduler and workers as generation (pooling requests are scheduled
whole and finish after their prompt is computed).

Truncation: `truncate_prompt_tokens=k` truncates text prompts with the tokenizer (its own side, as
vLLM does: right for BERT, keeping [CLS] ... [SEP]) and token-id prompts to their last k tokens;
-1 means max_model_len. Without it, an over-long prompt is refused (length and limit named).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from distllm.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringRequestOutput,
)
from distllm.params import PoolingParams


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) for t in x)


def _prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    return list(prompts)


class PoolingMixin:
    """Pooling methods of `LLM` (needs runner='pooling')."""

    # ---- model facts ---------------------------------------------------------------------

    def _pooling_model(self) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        from distllm.models.registry import get_model_class

        mc = self._engine().model_config  # type: ignore[attr-defined]
        cls = get_model_class(mc.architecture)
        return mc.architecture, tuple(getattr(cls, "pooling_tasks", ())), mc.hf_config

    def _check_task(self, task: str, method: str) -> None:
        arch, tasks, _ = self._pooling_model()
        if task not in tasks:
            raise ValueError(
                f"LLM.{method}() needs a model that supports the pooling task {task!r}; "
                f"this model ({arch}) supports {list(tasks)}."
            )

    def _num_labels(self) -> int:
        from distllm.layers.pooler import num_labels_of

        return num_labels_of(self._pooling_model()[2])

    # ---- building requests ---------------------------------------------------------------

    def _resolve_truncation(self, truncate: int | None) -> int | None:
        if truncate is None:
            return None
        max_len = self._engine().model_config.max_model_len  # type: ignore[attr-defined]
        if truncate == -1:
            return max_len
        if not isinstance(truncate, int) or truncate < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {truncate!r}.")
        if truncate > max_len:
            raise ValueError(
                f"truncate_prompt_tokens value ({truncate}) is greater than max_model_len ({max_len}). "
                "Please select a smaller truncation size."
            )
        return truncate

    def _pooling_params(
        self, pooling_params: Any, n: int, task: str, truncate: int | None
    ) -> list[PoolingParams]:
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, (list, tuple)):
            params = [p.clone() for p in pooling_params]
            if len(params) != n:
                raise ValueError(f"got {len(params)} PoolingParams for {n} prompts; pass one, or one per prompt.")
        else:
            params = [pooling_params.clone() for _ in range(n)]
        hidden = self._pooling_model()[2].get("hidden_size")
        for p in params:
            if not isinstance(p, PoolingParams):
                raise TypeError(f"pooling_params must be PoolingParams, got {type(p).__name__}.")
            p.task = task
            if truncate is not None:
                p.truncate_prompt_tokens = truncate
            elif p.truncate_prompt_tokens is not None:
                p.truncate_prompt_tokens = self._resolve_truncation(p.truncate_prompt_tokens)
            if p.dimensions is not None:
                if task != "embed":
                    raise ValueError(f"dimensions applies to embeddings only, not to task {task!r}.")
                if hidden is not None and p.dimensions > int(hidden):
                    raise ValueError(
                        f"dimensions ({p.dimensions}) is larger than the model's embedding size ({hidden})."
                    )
        return params

    def _tokenize_truncated(self, prompt: Any, truncate: int | None) -> Any:
        """Text prompts are truncated by the tokenizer itself (its truncation side)."""
        if truncate is None:
            return prompt
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
        if text is None:
            return prompt  # token ids: the input processor keeps the last `truncate` tokens
        tok = self.get_tokenizer()  # type: ignore[attr-defined]
        ids = tok(text, truncation=True, max_length=truncate)["input_ids"]
        return {"prompt": text, "prompt_token_ids": list(ids)}

    def _pool(
        self,
        prompts: Any,
        pooling_params: Any,
        task: str,
        truncate_prompt_tokens: int | None,
        use_tqdm: bool,
    ) -> list[PoolingRequestOutput]:
        plist = _prompt_list(prompts)
        truncate = self._resolve_truncation(truncate_prompt_tokens)
        params = self._pooling_params(pooling_params, len(plist), task, truncate)
        plist = [self._tokenize_truncated(p, sp.truncate_prompt_tokens) for p, sp in zip(plist, params)]
        return self._submit(plist, params, use_tqdm)

    def _submit(self, plist: list[Any], params: list[PoolingParams], use_tqdm: bool) -> list[PoolingRequestOutput]:
        ids = self._add_all(plist, params, None)  # type: ignore[attr-defined]
        outs = self._run(ids, use_tqdm, "Processed prompts")  # type: ignore[attr-defined]
        for o in outs:
            if o.outputs is None:
                raise RuntimeError(f"pooling request {o.request_id} failed in the worker (see the log).")
        return outs

    # ---- the methods ---------------------------------------------------------------------

    def embed(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding vector per prompt (`.outputs.embedding`)."""
        self._require_runner("pooling", "embed")  # type: ignore[attr-defined]
        self._check_task("embed", "embed")
        outs = self._pool(prompts, pooling_params, "embed", truncate_prompt_tokens, use_tqdm)
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    def classify(
        self,
        prompts: Any,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (`.outputs.probs`): softmax, or sigmoid for one label."""
        self._require_runner("pooling", "classify")  # type: ignore[attr-defined]
        self._check_task("classify", "classify")
        outs = self._pool(prompts, pooling_params, "classify", truncate_prompt_tokens, use_tqdm)
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def reward(
        self,
        prompts: Any,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[PoolingRequestOutput]:
        """The reward head's raw outputs for every token (`.outputs.data`, [num_tokens, num_labels])."""
        self._require_runner("pooling", "reward")  # type: ignore[attr-defined]
        self._check_task("reward", "reward")
        return self._pool(prompts, pooling_params, "reward", truncate_prompt_tokens, use_tqdm)

    def score(
        self,
        data_1: Any,
        data_2: Any,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[ScoringRequestOutput]:
        """Scores of text pairs (`.outputs.score`): 1 to 1, 1 to N, or N to N.

        A cross-encoder (a classifier with one label) reads each pair jointly; an embedding model
        scores by the cosine similarity of the two embeddings."""
        self._require_runner("pooling", "score")  # type: ignore[attr-defined]
        arch, tasks, _ = self._pooling_model()
        d1, d2 = self._score_inputs(data_1, "data_1"), self._score_inputs(data_2, "data_2")
        if not d1 or not d2:
            raise ValueError("score() needs at least one text in data_1 and in data_2.")
        if len(d1) > 1 and len(d1) != len(d2):
            raise ValueError(
                f"score() pairs data_1 with data_2 1:1, 1:N or N:N; got {len(d1)} and {len(d2)} texts."
            )
        if isinstance(pooling_params, (list, tuple)):
            raise TypeError("score() takes one PoolingParams for all pairs.")
        if "score" in tasks:
            n = self._num_labels()
            if n != 1:
                raise ValueError(
                    f"score() with a classifier needs a cross-encoder with one label; this model ({arch}) has "
                    f"num_labels={n}. Use classify() instead."
                )
            return self._cross_encoder_score(d1, d2, truncate_prompt_tokens, use_tqdm, pooling_params)
        if "embed" in tasks:
            return self._embedding_score(d1, d2, truncate_prompt_tokens, use_tqdm, pooling_params)
        raise ValueError(
            f"score() needs an embedding model or a cross-encoder; this model ({arch}) supports {list(tasks)}."
        )

    @staticmethod
    def _score_inputs(data: Any, name: str) -> list[str]:
        items = [data] if isinstance(data, (str, dict)) else list(data)
        out = []
        for x in items:
            if isinstance(x, dict) and isinstance(x.get("prompt"), str):
                x = x["prompt"]
            if not isinstance(x, str):
                raise TypeError(f"score() {name} must be a string or a list of strings, got {type(x).__name__}.")
            out.append(x)
        return out

    def _embedding_score(
        self, d1: list[str], d2: list[str], truncate: int | None, use_tqdm: bool, pooling_params: PoolingParams | None
    ) -> list[ScoringRequestOutput]:
        embs = self._pool(d1 + d2, pooling_params, "embed", truncate, use_tqdm)
        e1, e2 = embs[: len(d1)], embs[len(d1) :]
        if len(e1) == 1:
            e1 = e1 * len(e2)
        out = []
        for a, b in zip(e1, e2):
            sim = torch.nn.functional.cosine_similarity(a.outputs.data.float(), b.outputs.data.float(), dim=0)
            base = PoolingRequestOutput(
                request_id=f"{a.request_id}_{b.request_id}",
                outputs=PoolingOutput(sim.reshape(1)),
                prompt_token_ids=list(a.prompt_token_ids) + list(b.prompt_token_ids),
                finished=True,
            )
            out.append(ScoringRequestOutput.from_base(base))
        return out

    def _cross_encoder_score(
        self, d1: list[str], d2: list[str], truncate_prompt_tokens: int | None, use_tqdm: bool,
        pooling_params: PoolingParams | None,
    ) -> list[ScoringRequestOutput]:
        truncate = self._resolve_truncation(truncate_prompt_tokens)
        if len(d1) == 1:
            d1 = d1 * len(d2)
        tok = self.get_tokenizer()  # type: ignore[attr-defined]
        params = self._pooling_params(pooling_params, len(d2), "score", truncate)
        prompts = []
        for t1, t2, p in zip(d1, d2, params):
            k = p.truncate_prompt_tokens
            enc = tok(text=t1, text_pair=t2, truncation=k is not None, max_length=k)
            prompts.append({"prompt_token_ids": list(enc["input_ids"])})
            tt = enc.get("token_type_ids")
            p.token_type_ids = list(tt) if tt is not None and any(tt) else None
        outs = self._submit(prompts, params, use_tqdm)
        return [ScoringRequestOutput.from_base(o) for o in outs]


__all__ = ["PoolingMixin"]
