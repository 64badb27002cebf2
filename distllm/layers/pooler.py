"""Pooling for `runner="pooling"` models: one request's hidden rows -> what its task returns.

A model's `pool(hidden [n, hidden], params: dict) -> Tensor` gets all prompt rows of one request
(pooling prompts are computed in one step, never chunked) and the request's
`PoolingParams.to_worker_dict()`. The helpers here do the shared parts:

* pooling types (vLLM's names): CLS (first row), MEAN, LAST, ALL (every row), MAX;
* `normalize` (L2, default on for embeddings), `dimensions` (Matryoshka: keep the first k
  values, then renormalize);
* `use_activation` for classifier heads: softmax over labels, or sigmoid when there is one label.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F


class PoolingType(str, Enum):
    CLS = "CLS"
    MEAN = "MEAN"
    LAST = "LAST"
    ALL = "ALL"
    MAX = "MAX"


# Tasks a pooling model may serve (PoolingParams.task).
POOLING_TASKS = ("embed", "classify", "score", "reward", "encode")


def pool_hidden(hidden: torch.Tensor, pooling_type: PoolingType | str) -> torch.Tensor:
    """hidden [n, H] -> [H] (CLS, MEAN, LAST, MAX) or [n, H] (ALL). MEAN/MAX are computed in float32."""
    t = PoolingType(pooling_type)
    if hidden.ndim != 2 or hidden.shape[0] == 0:
        raise ValueError(f"pooling needs [n >= 1, hidden] rows, got shape {tuple(hidden.shape)}")
    if t is PoolingType.CLS:
        return hidden[0]
    if t is PoolingType.LAST:
        return hidden[-1]
    if t is PoolingType.MEAN:
        return hidden.float().mean(dim=0).to(hidden.dtype)
    if t is PoolingType.MAX:
        return hidden.max(dim=0).values
    return hidden


def normalize_embedding(x: torch.Tensor, dimensions: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Matryoshka truncation to `dimensions` (last axis), then L2 normalisation when asked."""
    if dimensions is not None:
        if dimensions > x.shape[-1]:
            raise ValueError(f"dimensions ({dimensions}) is larger than the model's embedding size ({x.shape[-1]}).")
        x = x[..., :dimensions]
    if normalize:
        x = F.normalize(x.float(), p=2, dim=-1).to(x.dtype)
    return x


def classifier_activation(logits: torch.Tensor, use_activation: bool | None = True) -> torch.Tensor:
    """softmax over labels; sigmoid when there is a single label (sentence-transformers' CrossEncoder)."""
    if use_activation is False:
        return logits
    logits = logits.float()
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def num_labels_of(hf_config: dict[str, Any]) -> int:
    id2label = hf_config.get("id2label")
    if id2label:
        return len(id2label)
    return int(hf_config.get("num_labels", 2))


@dataclass
class SentenceTransformersConfig:
    """What a sentence-transformers folder asks for: pooling type, normalisation, max length."""

    pooling_type: PoolingType | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None

    @staticmethod
    def read(folder: str | None) -> "SentenceTransformersConfig":
        out = SentenceTransformersConfig()
        if not folder or not os.path.isdir(folder):
            return out
        modules_path = os.path.join(folder, "modules.json")
        if os.path.isfile(modules_path):
            with open(modules_path) as f:
                modules = json.load(f)
            out.normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
            for m in modules:
                if str(m.get("type", "")).endswith(".Pooling"):
                    cfg_path = os.path.join(folder, m.get("path", ""), "config.json")
                    if os.path.isfile(cfg_path):
                        with open(cfg_path) as f:
                            out.pooling_type = _st_pooling_type(json.load(f))
        sb_path = os.path.join(folder, "sentence_bert_config.json")
        if os.path.isfile(sb_path):
            with open(sb_path) as f:
                msl = json.load(f).get("max_seq_length")
            out.max_seq_length = int(msl) if msl else None
        return out


def _st_pooling_type(cfg: dict[str, Any]) -> PoolingType:
    if cfg.get("pooling_mode_cls_token"):
        return PoolingType.CLS
    if cfg.get("pooling_mode_mean_tokens"):
        return PoolingType.MEAN
    if cfg.get("pooling_mode_lasttoken"):
        return PoolingType.LAST
    if cfg.get("pooling_mode_max_tokens"):
        return PoolingType.MAX
    mode = str(cfg.get("pooling_mode", "")).lower()
    mapping = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN, "lasttoken": PoolingType.LAST, "max": PoolingType.MAX}
    if mode in mapping:
        return mapping[mode]
    raise ValueError(f"unsupported sentence-transformers pooling config: {cfg}")


class Pooler:
    """Per-task pooling for one model. `head(pooled) -> logits` is the classifier (None: no head)."""

    def __init__(
        self,
        tasks: tuple[str, ...],
        embed_pooling: PoolingType = PoolingType.CLS,
        embed_normalize: bool = True,
        classify_pooling: PoolingType = PoolingType.LAST,
        reward_pooling: PoolingType = PoolingType.ALL,
    ):
        self.tasks = tasks
        self.embed_pooling = embed_pooling
        self.embed_normalize = embed_normalize
        self.classify_pooling = classify_pooling
        self.reward_pooling = reward_pooling

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"this model supports pooling tasks {self.tasks}, not {task!r}.")

    def __call__(self, hidden: torch.Tensor, params: dict[str, Any], head=None) -> torch.Tensor:
        task = params.get("task") or self.tasks[0]
        self.check_task(task)
        if task == "encode":
            return hidden
        if task == "embed":
            normalize = params.get("normalize")
            return normalize_embedding(
                pool_hidden(hidden, self.embed_pooling),
                params.get("dimensions"),
                self.embed_normalize if normalize is None else bool(normalize),
            )
        if head is None:
            raise ValueError(f"task {task!r} needs a classifier head; this model has none.")
        if task == "reward":
            out = head(pool_hidden(hidden, self.reward_pooling))
            return classifier_activation(out, params.get("use_activation")) if params.get("use_activation") else out
        logits = head(pool_hidden(hidden, self.classify_pooling))
        return classifier_activation(logits, params.get("use_activation"))


ST_CONFIG_KEY = "sentence_transformers"


def _tokenizer_sep_token_id(folder: str) -> int | None:
    """The [SEP] id of a BERT tokenizer folder (tokenizer_config.json + tokenizer.json or vocab.txt)."""
    sep = "[SEP]"
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc) as f:
            v = json.load(f).get("sep_token", sep)
        sep = v.get("content", sep) if isinstance(v, dict) else (v or sep)
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj) as f:
            data = json.load(f)
        for t in data.get("added_tokens") or []:
            if t.get("content") == sep:
                return int(t["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and sep in vocab:
            return int(vocab[sep])
    vt = os.path.join(folder, "vocab.txt")
    if os.path.isfile(vt):
        with open(vt, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.rstrip("\n") == sep:
                    return i
    return None


def apply_sentence_transformers_config(cfg: dict[str, Any], folder: str | None) -> dict[str, Any]:
    """config.json dict + its model folder -> the dict with what the pooling models read from the folder's
    other files: `cfg["sentence_transformers"]` ({"pooling_type", "normalize", "max_seq_length"}) for a
    sentence-transformers folder, and for BERT the tokenizer's `sep_token_id` when config.json lacks it.
    Meant to be called by the model source resolver (before hf_overrides); idempotent."""
    if ST_CONFIG_KEY in cfg:
        return cfg
    if cfg.get("model_type") == "bert" and cfg.get("sep_token_id") is None and folder and os.path.isdir(folder):
        sep = _tokenizer_sep_token_id(folder)  # BERT cross-encoders derive pair token types from [SEP]
        if sep is not None:
            cfg = {**cfg, "sep_token_id": sep}
    st = SentenceTransformersConfig.read(folder)
    if st.pooling_type is None and st.normalize is None and st.max_seq_length is None:
        return cfg
    return {
        **cfg,
        ST_CONFIG_KEY: {
            "pooling_type": st.pooling_type.value if st.pooling_type else None,
            "normalize": st.normalize,
            "max_seq_length": st.max_seq_length,
        },
    }
