"""Tensor parallelism on GPUs over NCCL: TP=2 and TP=4 against TP=1 (device machines only).

One random real-shaped Llama (hidden 2048, 16 heads, 8 KV heads, 4 layers, bf16) is saved once
as safetensors and loaded at every tp size, so every size sees the same weights (dummy weights
would differ: each rank fills its own shard). bf16 partial sums reduce in a different order at
each tp size, so the check is: the first greedy token of every prompt equal, its logprob within
bf16 tolerance, and the greedy continuations agreeing on most of their length.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
VOCAB = 32000
MAX_TOKENS = 16
PROMPTS = [[1, 306, 4658, 278, 6593, 310], [1, 450, 7483, 310, 3444, 338], [1] + list(range(100, 140))]


def make_wordlevel_tokenizer(folder: str, vocab: int) -> None:
    """A tokenizer of exactly `vocab` ids ("t0", "t1", ...), made offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    fast.save_pretrained(folder)


def llama_config(**kw) -> dict:
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu",
    )
    cfg.update(kw)
    return cfg


def save_random_llama(folder: str) -> str:
    """One random bf16 Llama as a safetensors folder (config, weights, tokenizer)."""
    from safetensors.torch import save_file

    cfg = llama_config()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    make_wordlevel_tokenizer(folder, VOCAB)
    g = torch.Generator().manual_seed(0)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(VOCAB, h, std=1.0), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": w(VOCAB, h, std=0.05)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    save_file(t, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_random_llama(str(tmp_path_factory.mktemp("llama_2048")))


def _run(folder: str, tp: int, backend: str | None):
    from distllm import LLM, SamplingParams

    llm = LLM(model=folder, tensor_parallel_size=tp, distributed_executor_backend=backend, device="cuda",
              dtype="bfloat16", num_gpu_blocks_override=512, max_model_len=1024, max_num_seqs=8)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        first_lp = [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outs]
        return ids, first_lp
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def reference(model_dir):
    if NUM_GPUS < 2:
        pytest.skip("needs >= 2 GPUs")
    return _run(model_dir, 1, None)


def _backends():
    out = ["mp"]
    if importlib.util.find_spec("ray") is not None:
        out.append("ray")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(model_dir, reference, tp, backend):
    if NUM_GPUS < tp:
        pytest.skip(f"needs {tp} GPUs, have {NUM_GPUS}")
    ref_ids, ref_lp = reference
    ids, lp = _run(model_dir, tp, backend)
    print(f"tp={tp} {backend}: ref {ref_ids}\n got {ids}")
    for r, o in zip(ref_ids, ids):
        assert r[0] == o[0]
        agree = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
        assert agree >= MAX_TOKENS // 2, (r, o)
    for a, b in zip(ref_lp, lp):
        assert abs(a - b) < 0.1, (ref_lp, lp)
