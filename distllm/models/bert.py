"""BERT encoder (bidirectional attention) for sentence embeddings (`BertModel`, sentence-transformers
folders such as all-MiniLM-L6-v2) and cross-encoders (`BertForSequenceClassification`).

Tensor-parallel shaped like the decoders: Q/K/V stacked in a QKVParallelLinear (kv heads = heads),
attention output and FFN output row-parallel, FFN intermediate column-parallel; word embeddings
vocab-parallel; position/token-type embeddings, LayerNorms, pooler and classifier replicated.

Token types: LLM.score sends a pair's token_type_ids in PoolingParams; when the model runner
passes them (`token_type_ids=step_token_type_ids(...)`, for models with `accepts_token_type_ids`)
they win; otherwise the cross-encoder derives them the way BERT tokenizers build a
pair (`[CLS] a [SEP] b [SEP]`): 0 up to and including the first [SEP] of each sequence, 1 after.
Single texts are all 0, as the tokenizer makes them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distllm.layers.attention import Attention
from distllm.layers.embedding import VocabParallelEmbedding
from distllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from distllm.layers.pooler import ST_CONFIG_KEY, Pooler, PoolingType, num_labels_of
from distllm.models.weights import load_named_weights

_STACKED = [
    ("qkv_proj", "query", "q"),
    ("qkv_proj", "key", "k"),
    ("qkv_proj", "value", "v"),
]


def _activation(name: str):
    name = (name or "gelu").lower()
    if name == "gelu":
        return lambda x: F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported BERT hidden_act {name!r}")


def _legacy_names(name: str) -> str:
    """Old TF-converted checkpoints name LayerNorm parameters gamma/beta."""
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def _layer_norm(hidden: int, eps: float, dtype: torch.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, eps=eps, dtype=dtype)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        h = cfg["hidden_size"]
        pet = cfg.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"BERT position_embedding_type {pet!r} is not supported (only 'absolute').")
        self.word_embeddings = VocabParallelEmbedding(cfg["vocab_size"], h, dtype)
        self.position_embeddings = nn.Embedding(cfg.get("max_position_embeddings", 512), h, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(max(1, cfg.get("type_vocab_size", 2)), h, dtype=dtype)
        self.LayerNorm = _layer_norm(h, cfg.get("layer_norm_eps", 1e-12), dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype):
        super().__init__()
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.head_dim = h // heads
        self.qkv_proj = QKVParallelLinear(h, self.head_dim, heads, heads, True, dtype)
        self.num_heads = self.qkv_proj.num_heads
        self.size = self.num_heads * self.head_dim
        self.attn = Attention(layer_idx, self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.size] * 3, dim=-1)
        return self.attn(q.contiguous(), k.contiguous(), v.contiguous())


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: dict[str, Any], in_features: int, dtype: torch.dtype):
        super().__init__()
        h = cfg["hidden_size"]
        self.dense = RowParallelLinear(in_features, h, True, dtype)
        self.LayerNorm = _layer_norm(h, cfg.get("layer_norm_eps", 1e-12), dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.self = BertSelfAttention(cfg, layer_idx, dtype)
        self.output = BertSelfOutput(cfg, cfg["hidden_size"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.dense = ColumnParallelLinear(cfg["hidden_size"], cfg["intermediate_size"], True, dtype)
        self.act = _activation(cfg.get("hidden_act", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.attention = BertAttention(cfg, layer_idx, dtype)
        self.intermediate = BertIntermediate(cfg, dtype)
        self.output = BertSelfOutput(cfg, cfg["intermediate_size"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i, dtype) for i in range(cfg["num_hidden_layers"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertPooler(nn.Module):
    """HF's BertPooler: dense + tanh on the [CLS] row."""

    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.dense = ReplicatedLinear(cfg["hidden_size"], cfg["hidden_size"], True, dtype)

    def forward(self, cls_row: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_row))


class _BertBody(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype, with_pooler: bool):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg, dtype)
        self.encoder = BertEncoder(cfg, dtype)
        self.pooler = BertPooler(cfg, dtype) if with_pooler else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids))


def derive_pair_token_type_ids(input_ids: torch.Tensor, positions: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """Token types of flattened sequences (each starts at position 0): 1 after the first [SEP]."""
    sep = (input_ids == sep_token_id).long()
    seps_before = torch.cumsum(sep, 0) - sep  # [SEP]s strictly before each token, over the whole batch
    starts = positions == 0
    if input_ids.numel():
        starts[0] = True
    seq_idx = torch.cumsum(starts.long(), 0) - 1
    offset = seps_before[starts][seq_idx]  # [SEP]s before the start of each token's sequence
    return ((seps_before - offset) >= 1).long()


def step_token_type_ids(
    num_scheduled_tokens: dict[str, int], states: dict[str, Any], device: torch.device | str
) -> torch.Tensor | None:
    """Token types of one step's flattened rows, from each request's pooling dict ("token_type_ids",
    set by LLM.score for cross-encoder pairs); -1 where a request has none (the model then derives
    them). None when no request in the step has any. For the model runner:

        if getattr(self.model, "accepts_token_type_ids", False):
            tt = step_token_type_ids(plan.num_scheduled_tokens, self.states, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, token_type_ids=tt)
    """
    out: list[int] = []
    found = False
    for rid, n in num_scheduled_tokens.items():
        st = states[rid]
        tt = (st.pooling or {}).get("token_type_ids") if st.pooling is not None else None
        nc = st.num_computed_tokens
        if tt:
            found = True
            part = list(tt[nc : nc + n])
            out.extend(part + [-1] * (n - len(part)))
        else:
            out.extend([-1] * n)
    if not found:
        return None
    return torch.tensor(out, dtype=torch.long, device=device)


class BertModel(nn.Module):
    """Sentence-embedding BERT: tasks embed (pooling and normalisation from the sentence-transformers
    files, else CLS + normalize, as vLLM) and encode (every token's hidden state)."""

    is_causal = False
    accepts_token_type_ids = True
    pooling_tasks = ("embed", "encode")

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.hf_config = hf_config
        self.model = _BertBody(hf_config, dtype, with_pooler=False)
        st = hf_config.get(ST_CONFIG_KEY) or {}
        self.pooler = Pooler(
            self.pooling_tasks,
            embed_pooling=PoolingType(st.get("pooling_type") or "CLS"),
            embed_normalize=True if st.get("normalize") is None else bool(st["normalize"]),
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = token_type_ids.clamp(min=0)  # -1: not given -> 0
        return self.model(input_ids, positions, token_type_ids)

    def pool(self, hidden: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return self.pooler(hidden, params)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        def name_map(name: str) -> str | None:
            if name.startswith("bert."):
                name = name[len("bert.") :]
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                return None
            return "model." + _legacy_names(name)

        return load_named_weights(self, weights, _STACKED, name_map=name_map)


class BertForSequenceClassification(nn.Module):
    """Cross-encoder: [CLS] row -> pooler (dense + tanh) -> classifier. Tasks: classify (softmax, or
    sigmoid for one label), score (the same; one label -> sigmoid of the logit), encode."""

    is_causal = False
    accepts_token_type_ids = True
    pooling_tasks = ("classify", "score", "encode")

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.hf_config = hf_config
        self.num_labels = num_labels_of(hf_config)
        self.bert = _BertBody(hf_config, dtype, with_pooler=True)
        self.classifier = ReplicatedLinear(hf_config["hidden_size"], self.num_labels, True, dtype)
        self.sep_token_id = hf_config.get("sep_token_id")
        if self.sep_token_id is None:
            self.sep_token_id = 102  # [SEP] in the BERT WordPiece vocabularies
        self.type_vocab_size = hf_config.get("type_vocab_size", 2)
        self.pooler = Pooler(self.pooling_tasks, classify_pooling=PoolingType.CLS)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if token_type_ids is None or bool((token_type_ids < 0).any()):
            if self.type_vocab_size > 1:
                derived = derive_pair_token_type_ids(input_ids, positions, self.sep_token_id)
            else:
                derived = torch.zeros_like(input_ids)
            if token_type_ids is not None:
                derived = torch.where(token_type_ids < 0, derived, token_type_ids)
            token_type_ids = derived
        return self.bert(input_ids, positions, token_type_ids)

    def _head(self, cls_row: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bert.pooler(cls_row))

    def pool(self, hidden: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return self.pooler(hidden, params, head=self._head)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        def name_map(name: str) -> str | None:
            if name.endswith("position_ids"):
                return None
            return _legacy_names(name)

        return load_named_weights(self, weights, _STACKED, name_map=name_map)
