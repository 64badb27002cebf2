"""Prompts -> token ids, and every check that needs the model, before any work is scheduled."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Union

from distllm.config import EngineConfig, ModelConfig
from distllm.params import PoolingParams, SamplingParams

# vLLM's prompt forms: a string, {"prompt": str}, {"prompt_token_ids": [...]}.
PromptType = Union[str, dict[str, Any], list[int]]


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


# tokenizer_config.json classes that are the generic tokenizers-backed class itself (Llama 3's
# "PreTrainedTokenizerFast"; transformers 5 saves "TokenizersBackend"), and the model types for
# which AutoTokenizer loads exactly that class (for others, qwen2 say, it substitutes the family's
# own class; tests/cpu/test_tokenizer_load.py checks the two agree).
_GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_GENERIC_TOKENIZER_MODEL_TYPES = frozenset({"llama", "qwen3"})


def load_tokenizer(model_config: ModelConfig):
    tok_path = model_config.tokenizer
    if tok_path.endswith(".gguf"):
        return _load_gguf_tokenizer_cached(tok_path)
    try:
        configs = _read_tokenizer_configs(tok_path)
        if configs is not None and _is_generic_fast(tok_path, *configs):
            # AutoTokenizer would resolve the same class, but its lookup imports
            # transformers.models, which reads every model family's source files (3,000+ files:
            # seconds on a fresh machine's cold disk, most of a cold start's tokenizer phase).
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(tok_path)
        from transformers import AutoTokenizer

        config = _light_tokenizer_config(tok_path, configs)
        kwargs = {} if config is None else {"config": config}
        return AutoTokenizer.from_pretrained(tok_path, trust_remote_code=model_config.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load the tokenizer from {tok_path!r} ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            "Add tokenizer files (tokenizer.json, tokenizer_config.json) to the folder, or pass tokenizer=<folder>."
        ) from None


def _read_tokenizer_configs(tok_path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tokenizer_config.json, config.json or {}) of a local folder, or None."""
    tc_path = os.path.join(tok_path, "tokenizer_config.json")
    if not os.path.isdir(tok_path) or not os.path.isfile(tc_path):
        return None
    try:
        with open(tc_path) as f:
            tok_cfg = json.load(f)
        model_cfg: dict[str, Any] = {}
        cfg_path = os.path.join(tok_path, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                model_cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(tok_cfg, dict) or not isinstance(model_cfg, dict):
        return None
    return tok_cfg, model_cfg


def _is_generic_fast(tok_path: str, tok_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> bool:
    return (tok_cfg.get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES
            and model_cfg.get("model_type") in _GENERIC_TOKENIZER_MODEL_TYPES
            and not model_cfg.get("tokenizer_class")
            and "auto_map" not in tok_cfg and "auto_map" not in model_cfg
            and os.path.isfile(os.path.join(tok_path, "tokenizer.json")))


def _light_tokenizer_config(tok_path: str, configs: tuple[dict[str, Any], dict[str, Any]] | None = None):
    """A bare config carrying what AutoTokenizer reads from the model's config (model_type,
    tokenizer_class, name), or None to let it load the config itself.

    AutoTokenizer loads the config through AutoConfig, which imports the model family's modeling
    stack (torch.distributed.tensor, sympy, ...): ~1 s of Python, and several more at a cold start,
    where it competes for the GIL with the worker's start-up. Taken only when tokenizer_config.json
    names its class and ships no remote code, the cases where the config decides nothing else."""
    from transformers import PreTrainedConfig

    if configs is None:
        configs = _read_tokenizer_configs(tok_path)
    if configs is None:
        return None
    tok_cfg, model_cfg = configs
    if not tok_cfg.get("tokenizer_class") or "auto_map" in tok_cfg or "auto_map" in model_cfg:
        return None
    config = PreTrainedConfig()
    config.model_type = model_cfg.get("model_type", "")
    config._name_or_path = tok_path
    if model_cfg.get("tokenizer_class"):
        config.tokenizer_class = model_cfg["tokenizer_class"]
    return config


def _tokenizer_cache_dir(gguf_path: str) -> str:
    import hashlib

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.realpath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("DISTLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "distllm")
    return os.path.join(root, "gguf-tokenizers", key)


def _load_gguf_tokenizer_cached(gguf_path: str):
    """Building a fast tokenizer from GGUF metadata takes seconds; its saved form loads in a fraction."""
    from transformers import AutoTokenizer

    from distllm.models.gguf_loader import load_gguf_tokenizer

    cache = _tokenizer_cache_dir(gguf_path)
    if os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt below
            pass
    tok = load_gguf_tokenizer(gguf_path)
    try:
        tmp = cache + f".tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home: just rebuild next time
    return tok


def load_generation_config(model_config: ModelConfig) -> dict[str, Any]:
    if model_config.gguf_file:
        from distllm.models.gguf_loader import gguf_generation_config

        return gguf_generation_config(model_config.gguf_file)
    path = os.path.join(model_config.model, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _as_id_set(v: Any) -> set[int]:
    if v is None:
        return set()
    return {int(x) for x in v} if isinstance(v, (list, tuple)) else {int(v)}


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.scheduler_config.max_model_len
        self.vocab_size = config.model_config.vocab_size
        self.generation_config = load_generation_config(config.model_config)
        self.eos_token_ids = _as_id_set(self.generation_config.get("eos_token_id"))
        if not self.eos_token_ids and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = {tokenizer.eos_token_id}

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's rule: the model's generation_config.json overrides SamplingParams' defaults."""
        gc = self.generation_config
        keys = {
            "repetition_penalty": "repetition_penalty",
            "temperature": "temperature",
            "top_k": "top_k",
            "top_p": "top_p",
            "min_p": "min_p",
            "max_new_tokens": "max_tokens",
        }
        kwargs = {ours: gc[theirs] for theirs, ours in keys.items() if gc.get(theirs) is not None}
        if gc.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        return SamplingParams(**kwargs)

    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            return ProcessedPrompt(prompt, self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return ProcessedPrompt(prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]])
            if "prompt" in prompt:
                return ProcessedPrompt(prompt["prompt"], self.tokenizer.encode(prompt["prompt"]))
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return ProcessedPrompt(None, list(prompt))
        raise TypeError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}.")

    def process(self, prompt: PromptType, params: SamplingParams | PoolingParams) -> ProcessedPrompt:
        p = self.tokenize(prompt)
        ids = p.prompt_token_ids
        truncate = params.truncate_prompt_tokens
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]  # keep the end of the prompt (vLLM's left truncation)
            p = ProcessedPrompt(p.prompt, ids)
        if not ids:
            raise ValueError("The decoder prompt cannot be empty.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (vocabulary size {self.vocab_size}).")
        if len(ids) > self.max_model_len or (len(ids) == self.max_model_len and isinstance(params, SamplingParams)):
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens "
                "plus the tokens to generate, or set truncate_prompt_tokens."
            )
        if isinstance(params, SamplingParams):
            self._prepare_sampling(params, len(ids))
        elif isinstance(params, PoolingParams):
            limit = self.config.scheduler_config.max_num_batched_tokens
            if len(ids) > limit:
                raise ValueError(
                    f"The pooling prompt (length {len(ids)}) is longer than max_num_batched_tokens ({limit}); "
                    "pooling prompts are computed in one step."
                )
        return p

    def _prepare_sampling(self, params: SamplingParams, prompt_len: int) -> None:
        params.verify_for_model(self.vocab_size, self.config.max_logprobs)
        params.update_from_generation_config(self.eos_token_ids)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - prompt_len
        if params.bad_words and params._bad_words_token_ids is None:
            seqs: list[list[int]] = []
            for word in params.bad_words:
                for text in (word, " " + word.lstrip()):
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                    if ids and ids not in seqs:
                        seqs.append(ids)
            params._bad_words_token_ids = seqs
