"""Compile distllm's Triton kernels ahead of time for a GPU this machine need not have, and read
their resources (registers a thread, stack spilled, shared memory) from the cubin.

    python benchmarks/kernel_aot.py gate_up --n 3584 --k 4096 --tiles 8,1024,4,4 2,1024,4,4
    python benchmarks/kernel_aot.py gemv --n 4096 --k 4096 --tiles 8,1024,4,4
    python benchmarks/kernel_aot.py decode_attn --heads 32 --kv-heads 8 --head-dim 128 --warps 4 8
    python benchmarks/kernel_aot.py paged_attn --warps 4 8

Each op's Python wrapper runs on small CPU tensors with every ops module's ``launch`` replaced
by a recorder (nothing runs); each recorded launch is then compiled with Triton's ASTSource for
GPUTarget("cuda", 90, 32), as a Hopper launch would have it (PDL on where the kernel takes
USE_PDL, the divisibility hints the launcher would derive from the arguments, and integer
arguments equal to 1 made the constant 1, as the launcher makes them), and
``cuobjdump -res-usage`` (shipped with Triton) reads the cubin. Needs no GPU and
must run without TRITON_INTERPRET. tests/cpu/test_kernels_compile.py uses the same recorder to
compile every kernel in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OPS_MODULES = ("launch", "triton_activation", "triton_all_reduce", "triton_all_reduce_ll", "triton_argmax",
               "triton_decode_attention", "triton_gemv", "triton_gguf_matmul", "triton_kv_store", "triton_norm",
               "triton_paged_attention", "triton_rotary")


@dataclass
class Launch:
    kernel: Any
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)  # {(param index, ...): [["tt.divisibility", 16]]}

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _type_of(v) -> Any:
    import torch

    if isinstance(v, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.bool: "i1"}
        return "*" + names[v.dtype]
    if isinstance(v, tuple):
        return tuple(_type_of(x) for x in v)
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


def _divisibility(kernel, values: dict) -> dict:
    """The hints Triton's launcher derives from a launch's arguments: a pointer whose address, or
    an integer whose value, is a multiple of 16 (unless its parameter opts out). Without them
    the compile loses the runtime's vectorized loads, and its registers are not the runtime's:
    the 8B decode GEMV took 165 registers compiled bare against 128 with the hints."""
    import torch

    attrs: dict = {}

    def mark(path: tuple, v, align: bool) -> None:
        if isinstance(v, tuple):
            for j, x in enumerate(v):
                mark(path + (j,), x, align)
            return
        if isinstance(v, torch.Tensor):
            divisible = v.data_ptr() % 16 == 0
        elif isinstance(v, int) and not isinstance(v, bool):
            divisible = v % 16 == 0
        else:
            return
        if divisible and align:
            attrs[path] = [["tt.divisibility", 16]]

    for i, p in enumerate(kernel.params):
        if not p.is_constexpr and not p.do_not_specialize and p.name in values:
            mark((i,), values[p.name], not p.do_not_specialize_on_alignment)
    return attrs


def _specialized_one(param, v) -> bool:
    """Triton's launcher turns an integer argument equal to 1 into the constant 1 (a unit stride
    then makes its loads contiguous) unless the parameter opts out of specialization."""
    return isinstance(v, int) and not isinstance(v, bool) and v == 1 and not param.do_not_specialize


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside: every ops module's ``launch`` records (kernel, argument types, constexprs,
    options) instead of launching."""
    import importlib

    calls: list[Launch] = []

    def record(kernel, grid, *args, **kwargs):
        names = [p.name for p in kernel.params]
        values = dict(zip(names, args))
        options = {}
        for k, v in kwargs.items():
            (values if k in names else options)[k] = v
        signature, constexprs = {}, {}
        for p in kernel.params:
            v = values[p.name] if p.name in values else p.default
            if p.is_constexpr or v is None or _specialized_one(p, v):
                signature[p.name], constexprs[p.name] = "constexpr", v
            else:
                signature[p.name] = _type_of(v)
        calls.append(Launch(kernel, signature, constexprs, options, _divisibility(kernel, values)))

    mods = [importlib.import_module(f"distllm.ops.{m}") for m in OPS_MODULES]
    saved = [(m, m.launch) for m in mods if hasattr(m, "launch")]
    for m, _ in saved:
        m.launch = record
    try:
        yield calls
    finally:
        for m, fn in saved:
            m.launch = fn


def variants(launch: Launch) -> list[tuple[dict, dict]]:
    """(constexprs, options) to compile: as recorded, and with PDL on where the kernel takes it."""
    out = [(launch.constexprs, launch.options)]
    if "USE_PDL" in launch.signature:
        out.append(({**launch.constexprs, "USE_PDL": True}, {**launch.options, "launch_pdl": True}))
    return out


def compile_for_sm90(launch: Launch, constexprs: dict, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(launch.kernel, launch.signature, constexprs, launch.attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> dict:
    """{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} of a compiled kernel's cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _drive(args: argparse.Namespace, tiles: tuple[int, ...]) -> None:
    import torch

    from distllm.ops import triton_decode_attention, triton_gemv, triton_paged_attention

    bf = torch.bfloat16
    if args.op == "paged_attn":  # decode split four ways, then a 512-token prompt (prefill tiles)
        hq, hk, d, page = args.heads, args.kv_heads, args.head_dim, 16
        cache = torch.zeros(64, page, hk, d, dtype=bf)
        bt = torch.zeros(2, 32, dtype=torch.int32)
        lens = torch.tensor([40, 512], dtype=torch.int32)
        triton_paged_attention.paged_attention(torch.zeros(2, hq, d, dtype=bf), cache, cache, bt, lens,
                                               torch.tensor([0, 1, 2], dtype=torch.int32), d**-0.5,
                                               max_query_len=1, max_seq_len=2048, num_splits=4)
        triton_paged_attention.paged_attention(torch.zeros(512, hq, d, dtype=bf), cache, cache, bt[:1], lens[1:],
                                               torch.tensor([0, 512], dtype=torch.int32), d**-0.5,
                                               max_query_len=512, max_seq_len=512)
        return
    if args.op == "decode_attn":  # one sequence, split KV, the fused decode kernel
        hq, hk, d, blocks, page = args.heads, args.kv_heads, args.head_dim, 64, 16
        q, kv = torch.zeros(1, hq, d, dtype=bf), torch.zeros(1, hk, d, dtype=bf)
        cache = torch.zeros(blocks, page, hk, d, dtype=bf)
        pos, lens = torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int32)
        triton_decode_attention.decode_attention(q, kv, kv, pos, torch.zeros(4096, 2 * d), cache, cache, pos,
                                                 torch.zeros(1, blocks, dtype=torch.int32), lens, d**-0.5, 2048,
                                                 num_splits=8)
        return
    x = torch.zeros(1, args.k, dtype=bf)
    if args.op == "gate_up":
        triton_gemv.gemv_gate_up(x, torch.zeros(2 * args.n, args.k, dtype=bf), config=tiles)
    else:
        triton_gemv.gemv(x, torch.zeros(args.n, args.k, dtype=bf), config=tiles)


def _triton_version() -> str:
    import triton

    return triton.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", choices=["gate_up", "gemv", "decode_attn", "paged_attn"])
    ap.add_argument("--n", type=int, default=4096, help="gemv / gate_up: outputs (gate_up: of gate, as many of up)")
    ap.add_argument("--k", type=int, default=4096, help="gemv / gate_up: inputs")
    ap.add_argument("--tiles", nargs="+", default=[],
                    help="gemv / gate_up: BLOCK_N,BLOCK_K,num_warps[,num_stages] each")
    ap.add_argument("--heads", type=int, default=32, help="decode_attn / paged_attn: query heads")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warps", nargs="+", type=int, default=[],
                    help="decode_attn / paged_attn: num_warps to compile with, each")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    if args.op in ("decode_attn", "paged_attn"):
        specs = [("warps", w) for w in args.warps or [None]]
    else:
        if not args.tiles:
            ap.error("--tiles is required for gemv and gate_up")
        specs = [("tiles", spec) for spec in args.tiles]
    rows = []
    for what, spec in specs:
        tiles = tuple(int(v) for v in spec.split(",")) if what == "tiles" else ()
        with recording() as calls:
            _drive(args, tiles)
        for launch in calls:
            consts, opts = variants(launch)[-1]
            if what == "warps" and spec is not None:
                opts = {**opts, "num_warps": spec}
            compiled = compile_for_sm90(launch, consts, opts)
            # Loads carrying an L2 cache policy (the GEMVs' evict-first weights, DISTLLM_GEMV_EVICT).
            hinted = len(re.findall(r"ld\.global[\w.:]*\.L2::cache_hint", compiled.asm["ptx"]))
            rows.append({"op": args.op, what: spec, "kernel": launch.name, "triton": _triton_version(),
                         **resources(compiled), "l2_hint_loads": hinted})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
