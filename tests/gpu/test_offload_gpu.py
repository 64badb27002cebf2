"""CPU offload on GPUs: greedy tokens with offloaded layers equal to without (tp 1, and tp 2
where two GPUs are visible), dummy weights equal too, and "auto" offloads some but not all
layers when memory is squeezed, nothing when it is not."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
VOCAB = 8192
H, INTER, LAYERS, HEADS, KV_HEADS = 512, 1408, 8, 8, 4
PROMPTS = [[1, 306, 4658, 278, 6593, 310], [1, 450, 7483], [1] + list(range(100, 160))]
MAX_TOKENS = 24


def _save_random_llama(folder: str) -> str:
    """A random fp32 Llama as a safetensors folder (config, weights, word-level tokenizer)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=H,
        intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, torch_dtype="float32", hidden_act="silu",
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    kv = KV_HEADS * (H // HEADS)

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": w(VOCAB, H, std=1.0), "model.norm.weight": torch.ones(H),
         "lm_head.weight": w(VOCAB, H, std=0.1)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(kv, H),
            p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, H),
            p + "mlp.gate_proj.weight": w(INTER, H), p + "mlp.up_proj.weight": w(INTER, H),
            p + "mlp.down_proj.weight": w(H, INTER),
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
        }
    save_file(t, os.path.join(folder, "model.safetensors"))
    return folder


LAYER_BYTES = 4 * (H * (H + 2 * KV_HEADS * (H // HEADS)) + H * H + 3 * H * INTER + 2 * H)  # fp32, one rank


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return _save_random_llama(str(tmp_path_factory.mktemp("offload_llama")))


def _generate(folder: str, **kw):
    """Greedy token ids per prompt, and the rank-0 runner's offload plan (None when off)."""
    from distllm import LLM, SamplingParams

    # float32: exact greedy comparisons, and LAYER_BYTES counts 4-byte weights (GPU "auto" would pick bf16).
    args = dict(model=folder, device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=1024)
    args.update(kw)
    llm = LLM(**args)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        ex = llm.llm_engine.executor
        runner = ex.worker.runner if hasattr(ex, "worker") else None
        off = runner.offload if runner is not None else None
        plan = (off.plan if off is not None else None)
        graphs = runner.graphs is not None if runner is not None else None
        return [list(o.outputs[0].token_ids) for o in outs], plan, graphs
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def reference(model_dir):
    # Eager, as every offloaded run is: CUDA graphs pad the batch to a captured size and size the
    # attention grid for max_model_len, which may change the last bits of fp32 logits.
    ids, plan, graphs = _generate(model_dir, enforce_eager=True)
    assert plan is None and not graphs
    return ids


@pytest.fixture
def distllm_log(caplog):
    """The distllm logger does not propagate to the root logger: listen on it directly."""
    import logging

    lg = logging.getLogger("distllm")
    lg.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    lg.removeHandler(caplog.handler)


@pytest.mark.parametrize("n_layers", [1, 3, LAYERS])
def test_offload_greedy_equal(model_dir, reference, n_layers, distllm_log):
    ids, plan, graphs = _generate(model_dir, cpu_offload_gb=n_layers * LAYER_BYTES / 2**30)
    assert plan is not None and len(plan.layers) == n_layers
    assert not graphs and "CUDA graphs off" in distllm_log.text  # off while layers are offloaded
    assert ids == reference


def test_offload_greedy_equal_eager(model_dir, reference, distllm_log):
    ids, plan, _ = _generate(model_dir, cpu_offload_gb=2 * LAYER_BYTES / 2**30, enforce_eager=True)
    assert plan.layers == [3, 7]
    assert ids == reference
    text = distllm_log.text
    assert "CPU offload: 2 of 8 layers [3, 7] in pinned host memory" in text and "GB/s" in text
    assert "fit in GPU memory without offload" in text  # a tiny model on a big GPU: the warning


def test_offload_dummy_bf16_equal(model_dir):
    """Dummy weights are drawn on the GPU for offloaded layers too, so both runs hold equal weights."""
    ref, _, _ = _generate(model_dir, load_format="dummy", dtype="bfloat16", enforce_eager=True)
    ids, plan, _ = _generate(model_dir, load_format="dummy", dtype="bfloat16", cpu_offload_gb=3 * LAYER_BYTES / 2 / 2**30)
    assert plan is not None and len(plan.layers) == 3
    assert ids == ref


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs >= 2 GPUs")
def test_offload_tp2_equal(model_dir):
    ref, _, _ = _generate(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=True)
    # A layer's shard is a little over LAYER_BYTES / 2 (the norms are replicated): LAYER_BYTES
    # asks for 2 layers on each rank.
    ids, _, _ = _generate(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp",
                          cpu_offload_gb=LAYER_BYTES / 2**30)
    assert ids == ref


def test_auto_offloads_only_when_squeezed(model_dir, reference):
    _, plan, graphs = _generate(model_dir, cpu_offload_gb="auto")
    assert plan is not None and plan.layers == [] and graphs  # plenty of memory: nothing offloaded

    # Squeeze: room for everything auto asks for, less 2.5 layers. With 2 staging slots, offloading
    # n layers frees n - 2: auto needs 5 (4 to 6 allowing for the few MiB it sees in use beyond `free`).
    from distllm.config import EngineArgs
    from distllm.worker.offload import _headroom_bytes

    cfg = EngineArgs(model=model_dir, device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=8,
                     max_num_batched_tokens=1024).create_engine_config()
    weights = LAYERS * LAYER_BYTES + 2 * VOCAB * H * 4 + H * 4
    kv = 1024 // 16 * 2 * LAYERS * 16 * KV_HEADS * (H // HEADS) * 4
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    want = (total - free) + weights + kv + _headroom_bytes(cfg) - int(2.5 * LAYER_BYTES)
    ids, plan, graphs = _generate(model_dir, cpu_offload_gb="auto", gpu_memory_utilization=want / total)
    print("auto squeezed:", plan.layers, plan.note)
    assert 4 <= len(plan.layers) <= 6 and not graphs
    assert ids == reference


def _forward(model, n_tokens: int, device) -> torch.Tensor:
    """One fresh prefill without KV cache, as the memory profile runs it."""
    from distllm.layers.attention import AttentionMetadata, forward_context

    ids = torch.randint(3, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens)).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((n_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros((1, 1), dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n_tokens], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n_tokens], dtype=torch.int32, device=device),
        max_query_len=n_tokens, max_seq_len=n_tokens, fresh_prefill_only=True,
    )
    with torch.inference_mode(), forward_context(meta, None):
        return model(ids, torch.arange(n_tokens, device=device))


@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_stager_bitwise_equal_when_copies_are_slow(model_dir, num_slots):
    """Big layers and few tokens: each copy (~2 ms) is far slower than its layer's compute, so a
    missing copy-before-use or use-before-reuse wait would show as wrong hidden states."""
    from distllm.config import EngineArgs
    from distllm.models.loader import load_model
    from distllm.worker.offload import CpuOffloader

    big = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
               num_hidden_layers=8)
    mc = EngineArgs(model=model_dir, device="cuda", load_format="dummy", dtype="bfloat16",
                    hf_overrides=big).create_engine_config().model_config
    dev = torch.device("cuda", 0)

    @torch.no_grad()
    def distinct_weights(model):
        # Dummy weights (+-1e-3) barely move the residual stream: a layer run with another
        # layer's weights would not show. Draw larger ones, equal in both models (drawn on the GPU
        # in parameter order, copied into host memory for offloaded layers).
        torch.manual_seed(7)
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, device=dev, dtype=p.dtype) * 0.02)
        return model

    plain = distinct_weights(load_model(mc, dev, seed=1))
    refs = {n: _forward(plain, n, dev).float() for n in (1, 16, 300)}
    del plain
    torch.cuda.empty_cache()
    o = CpuOffloader(6 * 120 * 2**20 / 2**30, dev, None, num_slots=num_slots)  # layers are 120.01 MiB
    model = distinct_weights(load_model(mc, dev, seed=1, place=o))
    assert len(o.plan.layers) == 6 and o.stager.schedule.num_slots == num_slots
    for _ in range(3):
        for n, ref in refs.items():
            out = _forward(model, n, dev).float()
            # Same kernels on equal weights: equal up to bf16 rounding at most; a race is O(1) off.
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.cuda.synchronize()
    for b in o.stager.bindings[0]:
        assert b.param.device.type == "cpu" and b.param.is_pinned()
