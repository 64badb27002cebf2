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
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="per request, input and output lengths uniform in [len * (1 - r), len * (1 + r)]; 0: fixed")
    p.add_argument("--dummy", action="store_true", help="random weights of the model's real shape")
    p.add_argument("--hf-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HF transformers generate on the same prompts")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: all prompts)")
    p.add_argument("--json", type=str, default=None, help="write the results here")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throughput", help="offline throughput on random prompts")
    add_args(p)
    p.set_defaults(func=main)


def random_lengths(n: int, length: int, ratio: float, seed: int = 0) -> list[int]:
    """n lengths uniform in [length * (1 - ratio), length * (1 + ratio)] (at least 1); ratio 0: all `length`."""
    import random

    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return [length] * n
    rng = random.Random(seed)
    lo = max(1, int(length * (1 - ratio)))
    hi = max(lo, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompts(n: int, input_len: int, vocab: int, seed: int = 0, lengths: list[int] | None = None) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    lengths = lengths or [input_len] * n
    # Avoid the first ids: special tokens in most vocabularies.
    return [[rng.randrange(100, vocab) for _ in range(k)] for k in lengths]


def run_distllm(args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int] | None = None) -> dict[str, Any]:
    from distllm import LLM, SamplingParams

    ea = EngineArgs.from_cli_args(args)
    if args.dummy:
        ea.load_format = "dummy"
    kw = {k: v for k, v in vars(ea).items() if k != "model"}
    llm = LLM(model=ea.model, **kw)
    sp: Any = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    if output_lens is not None:
        sp = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in output_lens]
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


def run_hf(model_config: Any, prompts: list[list[int]], output_len: int, batch_size: int | None, device: str,
           output_lens: list[int] | None = None) -> dict[str, Any]:
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
            if output_lens is None:
                x = torch.tensor(batch, device=device)  # equal lengths: no padding needed
                mask = torch.ones_like(x)
                want = output_len
            else:
                # Mixed lengths: left-pad; a static batch runs to its longest output, but only each
                # request's own length counts as output.
                width = max(len(p) for p in batch)
                x = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                want = max(output_lens[i : i + bs])
            out = model.generate(x, attention_mask=mask, max_new_tokens=want, min_new_tokens=want,
                                 do_sample=False, pad_token_id=0)
            made = out.shape[1] - x.shape[1]
            if output_lens is None:
                n_out += made * out.shape[0]
            else:
                n_out += sum(min(o, made) for o in output_lens[i : i + bs])
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
    ratio = getattr(args, "random_range_ratio", 0.0)
    in_lens = random_lengths(args.num_prompts, args.input_len, ratio, seed=1)
    out_lens = random_lengths(args.num_prompts, args.output_len, ratio, seed=2) if ratio else None
    prompts = random_prompts(args.num_prompts, args.input_len, mc.vocab_size, lengths=in_lens)
    ours = run_distllm(args, prompts, out_lens)
    mc = ours.pop("model_config")
    print(f"device: {device_name()}")
    spread = f" (lengths uniform within +-{ratio:.0%})" if ratio else ""
    print(f"model: {mc.architecture} ({mc.load_format}, {mc.dtype}), {args.num_prompts} prompts, "
          f"in {args.input_len} / out {args.output_len}{spread}")
    print(f"distllm: {ours['requests_per_s']:.2f} req/s, {ours['total_tok_per_s']:.1f} total tok/s, "
          f"{ours['output_tok_per_s']:.1f} output tok/s ({ours['seconds']:.2f} s)")
    res = {"device": device_name(), "distllm": ours}
    if args.hf_baseline:
        from distllm.models.source import resolve_device

        hf = run_hf(mc, prompts, args.output_len, args.hf_batch_size, resolve_device(args.device), out_lens)
        print(f"HF transformers generate (batch {hf['batch_size']}): {hf['output_tok_per_s']:.1f} output tok/s "
              f"({hf['seconds']:.2f} s)  -> distllm is {ours['output_tok_per_s'] / hf['output_tok_per_s']:.2f}x")
        res["hf"] = hf
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
