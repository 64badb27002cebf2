"""Batch-1 decode tokens/s at TP=1, 2, 4 (Llama-3.1-8B shape, dummy weights).

    python benchmarks/bench_tp_decode.py [--tp 1,2,4] [--backend mp|ray] [--tokens 256] \\
        [--model-shape llama3-8b|small] [--enforce-eager]

Decode rate = (N - 1) / (t(N tokens) - t(1 token)): the prefill and the first token are timed
separately and subtracted. Prints the card, then one row per tp size with the speedup over TP=1
(the issue's targets: TP=2 >= 1.7x, TP=4 >= 2.6x) and the weight-read roofline per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # Host-cost measurements on a CPU (bench_step_phases.py): the model's own work is tiny.
    "micro": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "small": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0,
    ),
}


def make_model_dir(shape: str) -> tuple[str, dict]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tempfile.mkdtemp(prefix=f"distllm-bench-{shape}-")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")
    cfg.update(SHAPES[shape])
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    vocab = cfg["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    return folder, cfg


def param_bytes(cfg: dict) -> int:
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    return 2 * (L * per_layer + v * h)  # bf16; the embedding read is one row, the LM head is all of it


def bench(folder: str, tp: int, backend: str, tokens: int, enforce_eager: bool, nccl_only: bool = False,
          prompt_len: int = 32, sampling: dict | None = None) -> float:
    from distllm import LLM, SamplingParams

    llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", tensor_parallel_size=tp,
              distributed_executor_backend=backend, max_model_len=2048, disable_custom_all_reduce=nccl_only,
              num_gpu_blocks_override=256, max_num_seqs=1, enforce_eager=enforce_eager)
    prompt = [{"prompt_token_ids": [1] + list(range(100, 99 + prompt_len))}]

    def timed(n: int) -> float:
        sp = SamplingParams(**(sampling or {"temperature": 0.0}), max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t

    try:
        timed(8)  # warm-up (CUDA graphs, allocator)
        t1 = min(timed(1) for _ in range(3))
        tn = min(timed(tokens) for _ in range(2))
        return (tokens - 1) / (tn - t1)
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--backend", default="mp", choices=["mp", "ray"])
    ap.add_argument("--tp1-backend", default="uni", choices=["uni", "mp", "ray"],
                    help="TP=1 baseline: in-process (uni), or one worker process (mp) to isolate transport cost")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32,
                    help="prompt tokens (decode attends to prompt + generated; max_model_len is 2048)")
    ap.add_argument("--model-shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--all-reduce", default="custom", choices=["custom", "nccl", "both"],
                    help="tp > 1: distllm's custom all-reduce (default; NCCL above its size limit), NCCL only, or both")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the issue's figure)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    args = ap.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if not 1 <= args.prompt_len <= 2048 - args.tokens:
        ap.error(f"--prompt-len must be in [1, {2048 - args.tokens}] (max_model_len 2048 minus --tokens)")

    import torch

    n_gpus = torch.cuda.device_count()
    card = torch.cuda.get_device_name(0) if n_gpus else "no CUDA device"
    props = torch.cuda.get_device_properties(0) if n_gpus else None
    print(f"card: {n_gpus} x {card}" + (f" ({props.total_memory / 2**30:.0f} GiB)" if props else ""))
    if not n_gpus:
        sys.exit("bench_tp_decode needs CUDA GPUs")
    folder, cfg = make_model_dir(args.model_shape)
    wbytes = param_bytes(cfg)
    print(f"model: {args.model_shape} dummy weights, {wbytes / 1e9:.2f} GB bf16; backend {args.backend}; "
          f"enforce_eager={args.enforce_eager}; {args.prompt_len}-token prompt, {args.tokens} decode tokens, batch 1; "
          f"sampling {sampling}")
    rows = []
    base = None
    for tp in [int(x) for x in args.tp.split(",")]:
        if tp > n_gpus:
            print(f"tp={tp}: skipped ({n_gpus} GPUs)")
            continue
        backend = args.backend if tp > 1 else args.tp1_backend
        modes = ["-"] if tp == 1 else (["custom", "nccl"] if args.all_reduce == "both" else [args.all_reduce])
        for mode in modes:
            rate = bench(folder, tp, backend, args.tokens, args.enforce_eager, nccl_only=mode == "nccl",
                         prompt_len=args.prompt_len, sampling=sampling)
            base = base or (rate if tp == 1 else None)
            rows.append((tp, mode, rate))
            speed = f"{rate / base:5.2f}x" if base else "  n/a"
            # Per GPU each token reads wbytes / tp of weights.
            gbps = rate * wbytes / tp / 1e9
            label = "" if tp == 1 else f" ({mode} all-reduce)"
            print(f"tp={tp}{label}: {rate:8.1f} tok/s  {speed}  ~{gbps:6.0f} GB/s of weights per GPU", flush=True)


if __name__ == "__main__":
    main()
