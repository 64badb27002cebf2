"""`distllm bench throughput`: offline throughput on random prompts, beside HF transformers."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from distllm.config import EngineArgs


def add_args(p: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(p)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dummy", action="store_true", help="random weights of the model's real shape")
    p.add_argument("--hf-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HF transformers generate on the same prompts")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: all prompts)")
    p.add_argument("--json", type=str, default=None, help="write the results here")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throughput", help="offline throughput on random prompts")
    add_args(p)
    p.set_defaults(func=main)


def random_prompts(n: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # Avoid the first ids: special tokens in most vocabularies.
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(n)]


def run_distllm(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from distllm import LLM, SamplingParams

    ea = EngineArgs.from_cli_args(args)
    if args.dummy:
        ea.load_format = "dummy"
    kw = {k: v for k, v in vars(ea).items() if k != "model"}
    llm = LLM(model=ea.model, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up (allocator, kernels) on one short request.
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    info = {"model_config": llm.llm_engine.model_config}
    llm.shutdown()
    return {"seconds": dt, "requests_per_s": len(prompts) / dt, "total_tok_per_s": (n_in + n_out) / dt,
            "output_tok_per_s": n_out / dt, "output_tokens": n_out, **info}


def run_hf(model_config: Any, prompts: list[list[int]], output_len: int, batch_size: int | None, device: str) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distllm.models.loader import torch_dtype

    dtype = torch_dtype(model_config.dtype)
    if model_config.load_format == "dummy":
        cfg = AutoConfig.for_model(**{k: v for k, v in model_config.hf_config.items() if k != "architectures"})
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    elif model_config.gguf_file:
        import os

        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_config.gguf_file), gguf_file=os.path.basename(model_config.gguf_file), torch_dtype=dtype
        ).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_config.model, torch_dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    bs = batch_size or len(prompts)
    n_out = 0
    with torch.inference_mode():
        x = torch.tensor([prompts[0][:8]], device=device)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), bs):
            batch = prompts[i : i + bs]
            x = torch.tensor(batch, device=device)  # equal lengths: no padding needed
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, pad_token_id=0)
            n_out += (out.shape[1] - x.shape[1]) * out.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tok_per_s": n_out / dt, "requests_per_s": len(prompts) / dt, "batch_size": bs}


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(args: argparse.Namespace) -> int:
    from distllm.config import EngineArgs as EA

    ea = EA.from_cli_args(args)
    if args.dummy:
        ea.load_format = "dummy"
    mc = ea.create_engine_config().model_config
    prompts = random_prompts(args.num_prompts, args.input_len, mc.vocab_size)
    ours = run_distllm(args, prompts)
    mc = ours.pop("model_config")
    print(f"device: {device_name()}")
    print(f"model: {mc.architecture} ({mc.load_format}, {mc.dtype}), {args.num_prompts} prompts, in {args.input_len} / out {args.output_len}")
    print(f"distllm: {ours['requests_per_s']:.2f} req/s, {ours['total_tok_per_s']:.1f} total tok/s, "
          f"{ours['output_tok_per_s']:.1f} output tok/s ({ours['seconds']:.2f} s)")
    res = {"device": device_name(), "distllm": ours}
    if args.hf_baseline:
        from distllm.models.source import resolve_device

        hf = run_hf(mc, prompts, args.output_len, args.hf_batch_size, resolve_device(args.device))
        print(f"HF transformers generate (batch {hf['batch_size']}): {hf['output_tok_per_s']:.1f} output tok/s "
              f"({hf['seconds']:.2f} s)  -> distllm is {ours['output_tok_per_s'] / hf['output_tok_per_s']:.2f}x")
        res["hf"] = hf
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
