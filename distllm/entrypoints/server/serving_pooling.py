"""/v1/embeddings, /score and /rerank: pooling models (runner="pooling") only.

Cross-encoders (`*ForSequenceClassification`) score a (text_1, text_2) pair in one pass
(task "score"); embedding models score by the cosine similarity of the two embeddings.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from distllm.entrypoints.server.errors import APIError
from distllm.entrypoints.server.protocol import EmbeddingRequest, RerankRequest, ScoreRequest, random_id
from distllm.entrypoints.server.serving_completion import OpenAIServing, run_unless_disconnected
from distllm.params import PoolingParams


def _vector(out: Any) -> list[float]:
    data = out.outputs.data if hasattr(out.outputs, "data") else out.outputs
    if hasattr(data, "tolist"):
        data = data.reshape(-1).tolist() if getattr(data, "ndim", 1) != 1 else data.tolist()
    return [float(x) for x in data]


def _cosine(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0


class OpenAIServingPooling(OpenAIServing):
    def require_pooling(self, route: str) -> None:
        if self.runner != "pooling":
            raise APIError(
                f"{route} needs a pooling model (embedding or cross-encoder, runner='pooling'); this server's "
                f"model runs with runner='{self.runner}'.", 400,
            )

    @property
    def is_cross_encoder(self) -> bool:
        return self.engine.model_config.architecture.endswith("ForSequenceClassification")

    async def _pool(self, prompts: list[dict[str, Any]], params: Any, priority: int, raw_request: Any) -> list[Any]:
        for p in prompts:
            if len(p["prompt_token_ids"]) > self.max_model_len:
                raise APIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your input has "
                    f"{len(p['prompt_token_ids'])} tokens; please reduce its length.", 400, param="input",
                )
        streams = await self.start_streams(random_id("pool"), prompts, params, priority, pooling=True)
        finals = await run_unless_disconnected(raw_request, self.collect_final(streams))
        for f in finals:
            if f is None or f.outputs is None:
                raise APIError("a pooling request was aborted", 500)
        return finals

    async def create_embedding(self, req: EmbeddingRequest, raw_request: Any = None) -> dict[str, Any]:
        self.check_model(req.model)
        self.require_pooling("/v1/embeddings")
        if self.is_cross_encoder:
            raise APIError("this model is a cross-encoder: use /score or /rerank, not /v1/embeddings.", 400)
        params = req.to_pooling_params()
        prompts = [{"prompt_token_ids": ids, **({"prompt": t} if t is not None else {})}
                   for t, ids in self.tokenize_prompts(req.input)]
        finals = await self._pool(prompts, params, req.priority, raw_request)
        data = []
        n_tokens = 0
        for i, f in enumerate(finals):
            vec = _vector(f)
            n_tokens += len(f.prompt_token_ids)
            if req.encoding_format == "base64":
                emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            else:
                emb = vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        return {"id": random_id("embd"), "object": "list", "model": self.model_name, "data": data,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def _scores(self, text_1: list[str], text_2: list[str], truncate: int | None, priority: int,
                      raw_request: Any) -> tuple[list[float], int]:
        if len(text_1) == 1 and len(text_2) > 1:
            text_1 = text_1 * len(text_2)
        if len(text_1) != len(text_2):
            raise APIError(f"text_1 has {len(text_1)} items and text_2 {len(text_2)}: pass one text_1, or as many "
                           "as text_2.", 400, param="text_1")
        if not text_2:
            raise APIError("text_2 cannot be empty.", 400, param="text_2")
        if self.is_cross_encoder:
            prompts, params = [], []
            for a, b in zip(text_1, text_2):
                enc = self.tokenizer(a, b)
                ids = list(enc["input_ids"])
                pp = PoolingParams(task="score", truncate_prompt_tokens=truncate)
                if "token_type_ids" in enc and hasattr(pp, "token_type_ids"):
                    pp.token_type_ids = list(enc["token_type_ids"])
                prompts.append({"prompt_token_ids": ids})
                params.append(pp)
            finals = await self._pool(prompts, params, priority, raw_request)
            scores = [_vector(f)[0] for f in finals]
        else:
            uniq = list(dict.fromkeys(text_1 + text_2))
            prompts = [{"prompt": t, "prompt_token_ids": self.tokenizer.encode(t)} for t in uniq]
            params = PoolingParams(task="embed", truncate_prompt_tokens=truncate)
            finals = await self._pool(prompts, params, priority, raw_request)
            vecs = {t: _vector(f) for t, f in zip(uniq, finals)}
            scores = [_cosine(vecs[a], vecs[b]) for a, b in zip(text_1, text_2)]
        return scores, sum(len(f.prompt_token_ids) for f in finals)

    async def create_score(self, req: ScoreRequest, raw_request: Any = None) -> dict[str, Any]:
        self.check_model(req.model)
        self.require_pooling("/score")
        t1 = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
        t2 = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
        scores, n_tokens = await self._scores(t1, t2, req.truncate_prompt_tokens, req.priority, raw_request)
        return {"id": random_id("score"), "object": "list", "model": self.model_name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def create_rerank(self, req: RerankRequest, raw_request: Any = None) -> dict[str, Any]:
        self.check_model(req.model)
        self.require_pooling("/rerank")
        if not req.documents:
            raise APIError("documents cannot be empty.", 400, param="documents")
        if req.top_n is not None and req.top_n < 1:
            raise APIError(f"top_n must be at least 1, got {req.top_n}.", 400, param="top_n")
        scores, n_tokens = await self._scores([req.query], list(req.documents), req.truncate_prompt_tokens,
                                              req.priority, raw_request)
        results = [{"index": i, "document": {"text": d}, "relevance_score": s}
                   for i, (d, s) in enumerate(zip(req.documents, scores))]
        results.sort(key=lambda r: -r["relevance_score"])
        if req.top_n is not None:
            results = results[: req.top_n]
        return {"id": random_id("rerank"), "model": self.model_name, "usage": {"total_tokens": n_tokens},
                "results": results}
