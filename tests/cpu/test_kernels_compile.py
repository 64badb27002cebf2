"""Every Triton kernel the decode and prefill paths launch compiles for a Hopper GPU (sm_90),
here on a machine without one: the CPU tests run the kernels under the interpreter, which
never builds the variants a GPU launch takes (PDL on) and may take code the compiler refuses.
A child process without TRITON_INTERPRET calls each op's Python wrapper on small CPU tensors
while benchmarks/kernel_aot.py records the launches, then compiles each recorded launch ahead
of time (Triton's ASTSource, GPUTarget("cuda", 90, 32), ptxas included): with its own argument
types and constexprs, and, for kernels that take USE_PDL, again with PDL on as a GPU launch
would have it. The GPU machines run an older Triton (3.6): this catches what both refuse, not
everything 3.6 alone would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The kernels every decode / prefill path reaches (a kernel renamed or dropped must be listed
# here again, so the check cannot silently shrink).
EXPECTED = {
    "_rms_norm_kernel", "_silu_and_mul_kernel", "_gemv_kernel", "_gemv_gate_up_kernel", "_store_kv_kernel",
    "_rotary_kernel", "_decode_attn_kernel", "one_shot_all_reduce_kernel", "all_reduce_add_rms_norm_kernel",
    "ll_all_reduce_add_rms_norm_kernel", "_paged_attn_kernel", "_split_reduce_kernel", "_argmax_chunks_kernel",
    "_argmax_rows_kernel", "_gemv_words_kernel", "_dequant_kernel", "_masked_lookup_kernel",
}


def _drive() -> None:
    """Call every op's wrapper once or twice on small CPU tensors (recorded: nothing runs)."""
    import torch

    from distllm.ops import (triton_activation, triton_all_reduce, triton_all_reduce_ll, triton_argmax,
                             triton_decode_attention, triton_embedding, triton_gemv, triton_gguf_matmul,
                             triton_kv_store, triton_norm, triton_paged_attention, triton_rotary)
    from distllm.ops.gguf_quant import GGMLType
    from distllm.ops.gguf_synthetic import random_blocks

    bf = torch.bfloat16
    x, res, w = torch.randn(1, 4096).to(bf), torch.randn(1, 4096).to(bf), torch.ones(4096, dtype=bf)
    triton_norm.rms_norm(x, w, 1e-5)
    triton_norm.fused_add_rms_norm(x, res, w, 1e-5)
    triton_activation.silu_and_mul(torch.randn(2, 256).to(bf))
    triton_embedding.masked_embedding(torch.tensor([3, 70000]), torch.randn(64128, 4096).to(bf), 64128, 128256)
    triton_gemv.gemv(x, torch.randn(6144, 4096).to(bf))  # streaming tiles
    triton_gemv.gemv(torch.randn(2, 576).to(bf), torch.randn(960, 576).to(bf), torch.randn(960).to(bf))  # one-shot
    triton_gemv.gemv(torch.randn(1, 2 * 1536).to(bf), torch.randn(576, 1536).to(bf), gated=True)
    triton_gemv.gemv_gate_up(x, torch.randn(2 * 14336, 4096).to(bf))
    triton_argmax.argmax_last_dim(torch.randn(2, 50000))
    t, hq, hk, d, blocks, bs = 3, 8, 2, 128, 8, 16
    q, k, v = torch.randn(t, hq, d).to(bf), torch.randn(t, hk, d).to(bf), torch.randn(t, hk, d).to(bf)
    kc, vc = torch.zeros(blocks, bs, hk, d, dtype=bf), torch.zeros(blocks, bs, hk, d, dtype=bf)
    slots, pos = torch.arange(t), torch.arange(t)
    cos_sin = torch.randn(64, 2 * d)
    triton_kv_store.store_kv(k, v, kc, vc, slots)
    triton_rotary.rotary_embedding(pos, q, k, cos_sin)
    ones = torch.ones(d, dtype=bf)
    triton_rotary.rotary_embedding(pos, q, k, cos_sin, q_weight=ones, k_weight=ones, kv_store=(v, kc, vc, slots))
    bt = torch.arange(blocks, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([5, 40], dtype=torch.int32)
    triton_paged_attention.paged_attention(q[:2], kc, vc, bt, lens, torch.tensor([0, 1, 2], dtype=torch.int32),
                                           d**-0.5, max_query_len=1, max_seq_len=2048, num_splits=4)  # split KV
    triton_paged_attention.paged_attention(q, kc, vc, bt, lens, torch.tensor([0, 1, 3], dtype=torch.int32),
                                           d**-0.5, max_query_len=2, max_seq_len=64)  # mixed prefill
    triton_decode_attention.decode_attention(q[:2], k[:2], v[:2], pos[:2], cos_sin, kc, vc, slots[:2], bt, lens,
                                             d**-0.5, 64)
    g = torch.Generator().manual_seed(0)
    for qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K):
        qw = random_blocks(qtype, 64, 512, g)
        for m in (1, 64):  # the word GEMV; dequantize, then a matmul
            triton_gguf_matmul.gguf_matmul(torch.randn(m, 512).to(bf), qw, qtype)
    world = 2
    bufs = tuple(torch.zeros(triton_all_reduce.data_bytes(world, 1 << 16) // 2, dtype=bf) for _ in range(world))
    flags, state = torch.zeros(world, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    triton_all_reduce.launch_one_shot(x.view(-1), x.view(-1), bufs, flags, state, err, 0, 10)
    for r in (res, None):  # a layer's norm; the first layer's (the embedding's sum, no residual)
        triton_all_reduce.launch_all_reduce_add_rms_norm(x, r, w, 1e-5, x.clone(), x.clone(), bufs, flags, state, err,
                                                         0, 10)
    ll_bufs = tuple(torch.zeros(triton_all_reduce_ll.region_bytes(world) // 8, dtype=torch.int64) for _ in range(world))
    for r in (res, None):
        triton_all_reduce_ll.launch_ll_all_reduce_add_rms_norm(x, r, w, 1e-5, x.clone(), x.clone(), ll_bufs, state,
                                                               err, 0, 10)


def _compile_all() -> dict:
    import kernel_aot

    with kernel_aot.recording() as calls:
        _drive()
    done, failed, seen = [], [], set()
    for launch in calls:
        for consts, opts in kernel_aot.variants(launch):
            key = (launch.name, json.dumps(launch.signature, sort_keys=True, default=str),
                   json.dumps(consts, sort_keys=True, default=str), json.dumps(opts, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            try:
                kernel_aot.compile_for_sm90(launch, consts, opts)
                done.append(launch.name)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                failed.append(f"{launch.name} {consts}: {type(e).__name__}: {str(e)[:1500]}")
    return {"compiled": done, "failed": failed}


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")


def _aot_rows(*args: str, env: dict | None = None) -> list[dict]:
    """The JSON rows `benchmarks/kernel_aot.py ARGS` prints, run compiled (no interpreter)."""
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "kernel_aot.py"), *args],
                       capture_output=True, text=True, env={**_compiled_env(), **(env or {})}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90():
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=_compiled_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(result["failed"])
    assert EXPECTED <= set(result["compiled"]), EXPECTED - set(result["compiled"])


def test_kernel_resources_cli():
    """benchmarks/kernel_aot.py: registers and spills from the sm_90 cubin, per GEMV tile and
    per warp count of the fused decode attention."""
    rows = _aot_rows("gemv", "--n", "64", "--k", "128", "--tiles", "4,64,2", "8,128,4")
    assert [row["tiles"] for row in rows] == ["4,64,2", "8,128,4"]
    assert all(row["kernel"] == "_gemv_kernel" and 0 < row["REG"] <= 255 and row["STACK"] >= 0 for row in rows)
    # The weights' evict-first policy reaches the sm_90 code (an L2 cache hint on their loads).
    assert all(row["l2_hint_loads"] > 0 for row in rows)
    rows = _aot_rows("decode_attn", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--warps", "4")
    assert [(row["kernel"], row["warps"]) for row in rows] == [("_decode_attn_kernel", 4)] and rows[0]["REG"] > 0
    rows = _aot_rows("paged_attn", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--warps", "4")
    # split decode (its reduce kernel too), then prefill tiles
    assert [row["kernel"] for row in rows] == ["_paged_attn_kernel", "_split_reduce_kernel", "_paged_attn_kernel"]


def test_large_gemv_tiles_fit_four_programs_an_sm():
    """The 8-row GEMV tiles of the 8B o_proj / down must stay at <= 128 registers a thread
    (sm_90): at 136 their 512 programs ran as two waves, ~7 us slower each (benchmarks/README.md,
    sixteenth session). A failure here after a kernel change is a slowdown to measure first."""
    row = _aot_rows("gemv", "--n", "4096", "--k", "14336", "--tiles", "8,1024,4,4")[0]
    assert row["REG"] <= 128 and row["STACK"] == 0, row


def test_recorded_launches_carry_the_launchers_divisibility_hints():
    """A pointer (or integer) that is a multiple of 16 gets tt.divisibility 16, as Triton's
    launcher gives it at run time; do_not_specialize parameters and odd values get nothing."""
    import torch
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, BENCHMARKS)
    import kernel_aot

    def body(a_ptr, b_ptr, n, m, odd, flag, f, BLOCK: tl.constexpr):
        pass

    k = JITFunction(body, do_not_specialize=["m"])  # not triton.jit: other modules set TRITON_INTERPRET

    buf = torch.zeros(64, dtype=torch.float16)
    record = kernel_aot._divisibility(k, {"a_ptr": buf, "b_ptr": buf[1:], "n": 4096, "m": 32, "odd": 30,
                                          "flag": True, "f": 1.0, "BLOCK": 16})
    assert record == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    assert kernel_aot._divisibility(k, {"a_ptr": (buf, buf[3:])}) == {(0, 0): [["tt.divisibility", 16]]}


_UNIT_INTEGERS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernel_aot
from distllm.ops import triton_paged_attention as tpa
bf = torch.bfloat16
cache = torch.zeros(8, 16, 2, 64, dtype=bf)
with kernel_aot.recording() as calls:
    tpa.paged_attention(torch.zeros(2, 4, 64, dtype=bf), cache, cache, torch.zeros(2, 4, dtype=torch.int32),
                        torch.tensor([5, 40], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32),
                        0.125, max_query_len=1, max_seq_len=64, num_splits=1)
(launch,) = calls
print(json.dumps({n: [launch.signature[n], launch.constexprs.get(n)] for n in ("stride_kcd", "stride_kcs", "num_splits")}))
"""


def test_recorded_launches_specialise_unit_integers():
    """An integer argument equal to 1 is compiled as the constant 1, as Triton's launcher does
    (a unit stride then gives contiguous, vectorised loads); a do_not_specialize one stays an
    integer. Without this the paged attention compiled offline at 255 registers with spills,
    against 91 at run time. (A subprocess: other test modules leave the kernels interpreted.)"""
    r = subprocess.run([sys.executable, "-c", _UNIT_INTEGERS, BENCHMARKS], capture_output=True, text=True,
                       env=_compiled_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sig = json.loads(r.stdout.strip().splitlines()[-1])
    assert sig["stride_kcd"] == ["constexpr", 1]
    assert sig["stride_kcs"] == ["i32", None]  # 2 kv heads x 64
    assert sig["num_splits"] == ["i32", None]  # do_not_specialize, though it is 1 here


def test_paged_attention_does_not_spill():
    """Decode and prefill tiles of the 8B shape compile for sm_90 without stack spills at 4 warps
    (the default for decode tiles) and at 8."""
    rows = _aot_rows("paged_attn", "--warps", "4", "8")
    assert len(rows) == 6 and all(row["STACK"] == 0 for row in rows), rows


if __name__ == "__main__":
    sys.path.insert(0, BENCHMARKS)
    print(json.dumps(_compile_all()))


def test_gate_up_weights_evict_first_unless_normal():
    """The gate/up GEMV's weight loads carry the L2 hint by default; DISTLLM_GEMV_EVICT=normal
    compiles them without it."""
    args = ("gate_up", "--n", "64", "--k", "128", "--tiles", "2,64,2")
    assert _aot_rows(*args)[0]["l2_hint_loads"] > 0
    assert _aot_rows(*args, env={"DISTLLM_GEMV_EVICT": "normal"})[0]["l2_hint_loads"] == 0

