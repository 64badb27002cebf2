"""Decoder forward passes against transformers: prefill logits and greedy tokens via the paged KV path."""

from __future__ import annotations

import pytest
import torch

from distllm.config import EngineArgs
from distllm.layers.attention import AttentionMetadata, forward_context
from distllm.models.loader import load_model
from distllm.worker.kv_cache import KVCacheSpec, allocate_kv_cache


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _ours(folder):
    cfg = EngineArgs(model=folder, device="cpu").create_engine_config()
    return load_model(cfg.model_config, "cpu"), cfg


def _prefill_meta(lens: list[int]) -> AttentionMetadata:
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.full((sum(lens),), -1, dtype=torch.int64),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=qsl,
        max_query_len=max(lens),
        max_seq_len=max(lens),
        fresh_prefill_only=True,
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_prefill_logits_match_hf(tiny_models, kind):
    folder = tiny_models[kind]
    hf = _hf_model(folder)
    ours, _ = _ours(folder)
    g = torch.Generator().manual_seed(1)
    lens = [1, 7, 23, 40]
    prompts = [torch.randint(0, 49152, (n,), generator=g) for n in lens]
    ids = torch.cat(prompts)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), forward_context(_prefill_meta(lens), None):
        logits = ours.compute_logits(ours(ids, pos))
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(p[None]).logits[0]
        got = logits[start : start + len(p)]
        start += len(p)
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()


def _paged_greedy(model, spec_cfg, prompt: list[int], steps: int, block_size: int = 4) -> list[int]:
    """Greedy decode through the paged KV path: prefill in two chunks, then one token a step."""
    mc = spec_cfg.model_config
    spec = KVCacheSpec(mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim, torch.float32)
    caches = allocate_kv_cache(spec, 64, torch.device("cpu"))
    # Deliberately non-contiguous block ids.
    blocks = list(range(63, 0, -3))
    tokens = list(prompt)
    computed = 0
    chunks = [len(prompt) // 2, len(prompt) - len(prompt) // 2]
    out = []

    def run(n_new: int) -> torch.Tensor:
        nonlocal computed
        pos = torch.arange(computed, computed + n_new)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in pos.tolist()])
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=torch.tensor([blocks], dtype=torch.int32),
            seq_lens=torch.tensor([computed + n_new], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n_new], dtype=torch.int32),
            max_query_len=n_new,
            max_seq_len=computed + n_new,
        )
        with torch.no_grad(), forward_context(meta, caches):
            h = model(torch.tensor(tokens[computed : computed + n_new]), pos)
            logits = model.compute_logits(h[-1:])
        computed += n_new
        return logits

    for c in chunks:
        if c:
            logits = run(c)
    for _ in range(steps):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        tokens.append(nxt)
        logits = run(1)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_paged_matches_hf_generate(tiny_models, kind):
    folder = tiny_models[kind]
    hf = _hf_model(folder)
    ours, cfg = _ours(folder)
    prompt = torch.randint(0, 49152, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_tokens = ref[0, len(prompt) :].tolist()
    assert _paged_greedy(ours, cfg, prompt, 32) == ref_tokens
