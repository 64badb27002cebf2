"""SmolLM2-135M-Instruct with real weights (GGUF Q4_1 dequantized to float32) against
transformers' own loading of the same GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from distllm import LLM, SamplingParams
from distllm.layers.attention import AttentionMetadata, forward_context

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def hf_smol(smol_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smol_gguf), gguf_file=os.path.basename(smol_gguf), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smol_llm():
    llm = LLM(device="cpu", max_model_len=512)  # no model: the embedded default
    yield llm
    llm.shutdown()


def test_default_model_is_smollm2(smol_llm):
    mc = smol_llm.llm_engine.model_config
    assert mc.architecture == "LlamaForCausalLM" and mc.load_format == "gguf"
    assert mc.num_layers == 30 and mc.num_heads == 9 and mc.num_kv_heads == 3 and mc.vocab_size == 49152


def test_prefill_logits_close_to_hf(smol_llm, hf_smol):
    tok = smol_llm.get_tokenizer()
    model = smol_llm.llm_engine.executor.worker.runner.model
    ids = [tok.encode(p) for p in PROMPTS]
    lens = [len(i) for i in ids]
    meta = AttentionMetadata(
        slot_mapping=torch.full((sum(lens),), -1, dtype=torch.int64),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        fresh_prefill_only=True,
    )
    with torch.no_grad(), forward_context(meta, None):
        ours = model.compute_logits(model(torch.tensor(sum(ids, [])), torch.cat([torch.arange(n) for n in lens])))
    start = 0
    for seq in ids:
        with torch.no_grad():
            ref = hf_smol(torch.tensor([seq])).logits[0]
        got = ours[start : start + len(seq)]
        start += len(seq)
        assert (got - ref).abs().max() < 2e-3, (got - ref).abs().max()
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_generate_equals_hf(smol_llm, hf_smol):
    tok = smol_llm.get_tokenizer()
    max_tokens = [32, 20, 32]
    refs = []
    for p, m in zip(PROMPTS, max_tokens):
        ids = tok.encode(p)
        with torch.no_grad():
            out = hf_smol.generate(torch.tensor([ids]), max_new_tokens=m, do_sample=False, eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(ids) :].tolist())
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = smol_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    for o, r in zip(outs, refs):
        assert o.outputs[0].text == tok.decode(r, skip_special_tokens=True)


def test_chat_uses_template_and_stops_at_eos(smol_llm):
    outs = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=40),
        use_tqdm=False,
    )
    out = outs[0]
    assert "<|im_start|>assistant" in out.prompt
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
