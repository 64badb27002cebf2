"""benchmarks/roofline.py arithmetic on hand-computed numbers, and a CPU smoke run of
benchmarks/bench_fastpath.py's whole scenario machinery on a 2-layer, hidden-64 model."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import bench_fastpath as bf  # noqa: E402
import bench_tp_decode as btd  # noqa: E402
import roofline as rl  # noqa: E402

# hidden 8, 2 layers, 2 heads of 4, 1 KV head, vocab 10:
#   layer matmuls: 8*(8 + 2*4) + 8*8 + 3*8*16 = 128 + 64 + 384 = 576
#   weights read a step (bf16): 2 * (2*576 + 10*8) = 2464 bytes; KV a token: 2 layers * 2 * 1 * 4 * 2 = 32 bytes
TOY = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           vocab_size=10)


def test_weights_and_kv_bytes():
    assert rl.layer_matmul_params(TOY) == 576
    assert rl.weight_bytes_per_step(TOY) == 2464
    assert rl.weight_bytes_per_step(TOY, dtype_bytes=4) == 4928
    assert rl.kv_bytes_per_token(TOY) == 32
    assert rl.decode_step_bytes(TOY, 2, [3, 5]) == 2464 + 8 * 32
    assert rl.decode_step_bytes(TOY, 3, 4) == 2464 + 12 * 32
    with pytest.raises(ValueError):
        rl.decode_step_bytes(TOY, 3, [1, 2])


def test_llama3_8b_weights_match_the_known_size():
    cfg = btd.SHAPES["llama3-8b"]
    assert rl.weight_bytes_per_step(cfg) == 15_009_316_864 == btd.param_bytes(cfg)
    assert rl.kv_bytes_per_token(cfg) == 131072  # 32 layers * 2 * 8 heads * 128 * 2 bytes
    qwen = btd.SHAPES["qwen3-0.6b"]  # head_dim 128 given explicitly (16 heads * 128 != hidden 1024)
    assert rl.kv_bytes_per_token(qwen) == 28 * 2 * 8 * 128 * 2


def test_prefill_flops():
    # attention, T = 4: pairs 1+2+3+4 = 10; 4 * L * heads * head_dim = 4*2*2*4 = 64 -> 640
    assert rl.causal_attention_flops(TOY, 4) == 640
    # cached 2: queries at positions 2, 3 -> 3 + 4 = 7 pairs -> 448
    assert rl.causal_attention_flops(TOY, 4, 2) == 448
    # 2 * L * 576 * 4 tokens + LM head once 2 * 80 + attention 640
    assert rl.prefill_flops(TOY, [4]) == 9216 + 160 + 640
    assert rl.prefill_flops(TOY, [4], [2]) == 4608 + 160 + 448
    assert rl.prefill_flops(TOY, [4, 4]) == 2 * 10016


def test_decode_steps_and_bytes():
    assert rl.decode_steps([3, 3, 3], max_batch=2) == 3  # 6 decode tokens, 2 a step
    assert rl.decode_steps([5, 1], max_batch=8) == 4  # the longest request bounds it
    assert rl.decode_steps([1, 1], max_batch=8) == 0  # the prefill makes the only token
    # prompt 4, out 3: tokens 2 and 3 read contexts of 5 and 6 -> 11 tokens * 32 bytes
    assert rl.decode_kv_bytes(TOY, [4], [3]) == 352
    assert rl.decode_bytes(TOY, [4], [3], max_batch=256) == 2 * 2464 + 352


def test_roofline_time_and_decode_rate():
    ceil = rl.Ceilings(bandwidth=1000.0, matmul_rate=100.0)
    assert rl.roofline_time(TOY, [4], [3], ceil, max_batch=256) == pytest.approx(10016 / 100 + 5280 / 1000)
    # the same two steps: 5280 bytes for 2 tokens at 1000 B/s
    assert rl.decode_roofline_tok_s(TOY, 4, 3, 1000.0) == pytest.approx(2 * 1000 / 5280)


def test_8b_batch1000_roofline_is_plausible():
    # ~14.6 PFLOP of prefill at 790 TFLOP/s (~18.5 s) + ~26 TB of decode reads at 3 TB/s (~8.6 s)
    cfg = btd.SHAPES["llama3-8b"]
    ceil = rl.Ceilings(3.0e12, 790e12)
    t = rl.roofline_time(cfg, [1024] * 1000, [128] * 1000, ceil, max_batch=256)
    assert 26 < t < 28.5


def test_decode_rate_subtracts_the_first_token():
    calls = []

    def gen(n):  # 50 ms of prefill and first token, then 10 ms a token
        calls.append(n)
        return 0.05 + 0.01 * (n - 1)

    res = bf.decode_rate(gen, 128)
    assert res["tok_s"] == pytest.approx(100.0) and res["t1_s"] == pytest.approx(0.05)
    assert calls == [8, 1, 1, 1, 128, 128]  # warm-up, 3 x t(1), 2 x t(N)
    assert math.isnan(bf.decode_rate(lambda n: 1.0, 16)["tok_s"])  # noise: no rate, not a negative one


def test_workloads():
    a = bf.random_len_workload(256, 100, 1024, vocab=500, seed=0)
    b = bf.random_len_workload(256, 100, 1024, vocab=500, seed=0)
    assert a.prompts == b.prompts and a.out_lens == b.out_lens
    assert all(100 <= n <= 1024 for n in a.prompt_lens + a.out_lens)
    assert len(set(a.out_lens)) > 100  # really random, not one length
    assert all(100 <= t < 500 for p in a.prompts[:5] for t in p)
    w = bf.prefix_workload(3, 4, prefix_len=8, suffix_len=2, out_len=5, vocab=500)
    assert len(w.prompts) == 12 and set(w.prompt_lens) == {10} and w.out_lens == [5] * 12
    assert w.cached_lens.count(0) == 3 and w.cached_lens.count(8) == 9
    assert len({tuple(p[:8]) for p in w.prompts}) == 3 and len({tuple(p) for p in w.prompts}) == 12


def test_choose_hf_batch():
    cfg = btd.SHAPES["llama3-8b"]
    assert bf.choose_hf_batch(cfg, 1000, 1024, 128, free_bytes=10**15) == 512  # powers of two, <= prompts
    assert bf.choose_hf_batch(cfg, 1000, 1024, 128, free_bytes=10**8) == 1  # not even one: try one anyway
    # per sequence: KV 1152 * 128 KiB = 151 MB, MLP/residuals 1024 * 59392 * 2 = 122 MB, attention
    # 32 * 1024^2 * 2 = 67 MB, logits 1 MB -> ~341 MB; 0.8 * 63 GB (an H100 with the 8B loaded) -> 147
    assert bf.choose_hf_batch(cfg, 1000, 1024, 128, free_bytes=63 * 10**9) == 128
    assert bf.choose_hf_batch(cfg, 256, 128, 1024, free_bytes=63 * 10**9) == 256


def test_make_row_verdicts():
    d = {"distllm": {"tok_s": 160.0, "roofline_fraction": 0.95, "roofline_tok_s": 168.0}, "hf": {"tok_s": 10.0}}
    assert bf.make_row("decode8b", d, "NVIDIA H100").result == "PASS"
    d["hf"]["tok_s"] = 20.0  # 8x only
    assert bf.make_row("decode8b", d, "NVIDIA H100").result.startswith("MISS")
    del d["hf"]
    assert "not measured: HF" in bf.make_row("decode8b", d, "NVIDIA H100").result
    q = {"distllm": {"output_tok_s": 14000.0, "seconds": 10.0, "roofline_fraction": 0.5, "roofline_s": 5.0}}
    assert bf.make_row("qwen3", q, "NVIDIA H100").result == "MISS"
    run = lambda tok_s: {"output_tok_s": tok_s, "roofline_fraction": 0.5}  # noqa: E731
    p = {"prefix_caching_on": run(300.0), "prefix_caching_off": run(100.0),
         "prefix_unique_caching_on": run(99.0), "prefix_unique_caching_off": run(100.0)}
    assert bf.make_row("prefix", p, "x").result == "PASS"
    p["prefix_unique_caching_on"] = run(97.0)  # ~3.1% slower
    assert bf.make_row("prefix", p, "x").result == "MISS"
    assert bf.make_row("coldstart", {"distllm": {"seconds": 21.0}}, "x").result == "MISS"
    assert "errors" in bf.make_row("coldstart", {"error (x)": "boom"}, "x").result
    assert "| coldstart |" in bf.markdown_table([bf.make_row("coldstart", {"distllm": {"seconds": 3.0}}, "x")])


def test_parse_args():
    opts, sc = bf.parse_args(["--scenario", "decode8b,prefix", "--scale", "0.5", "--no-hf"])
    assert sc == ["decode8b", "prefix"] and opts.count(1000) == 500 and not opts.hf
    assert bf.parse_args([])[1] == bf.SCENARIOS
    with pytest.raises(SystemExit):
        bf.parse_args(["--scenario", "nope"])
    with pytest.raises(SystemExit):
        bf.parse_args(["--scale", "2"])


def test_smoke_all_scenarios_on_cpu(tmp_path, capsys):
    """Every scenario end to end on CPU with the tiny shape: engines, HF baselines, cold-start child,
    the JSON and the summary table."""
    out = tmp_path / "fastpath.json"
    rc = bf.main(["--scenario", "all", "--device", "cpu", "--shape-override", "tiny", "--scale", "0.01",
                  "--len-scale", "0.03", "--hf-timeout", "3", "--json", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    errors = {s: {k: v for k, v in d.items() if k.startswith("error")} for s, d in res["scenarios"].items()}
    assert rc == 0, errors
    sc = res["scenarios"]
    assert set(sc) == set(bf.SCENARIOS) | {bf.SHARED}
    for s in ("decode8b", "smollm2"):
        # Rates are differences of two timings: a loaded CPU can make one NaN (never negative).
        d, hf = sc[s]["distllm"], sc[s]["hf"]
        assert d["tokens"] == 16 and d["tn_s"] > 0 and hf["tn_s"] > 0
        assert not d["tok_s"] <= 0 and not hf["tok_s"] <= 0 and not d["roofline_fraction"] <= 0
    for s in ("batch1000", "long256", "qwen3"):
        assert sc[s]["distllm"]["output_tokens"] > 0 and sc[s]["distllm"]["roofline_fraction"] > 0
        assert sc[s]["hf"]["useful_tokens"] > 0
    # 1000 * 0.01 prompts, 128 * 0.03 tokens each (raised to the 16-token floor)
    assert sc["batch1000"]["distllm"]["output_tokens"] == 10 * 16
    assert sc["long256"]["distllm"]["output_tokens"] == 3 * 31  # 256 * 0.01 prompts, 1024 * 0.03 tokens each
    for k in ("prefix_caching_on", "prefix_caching_off", "prefix_unique_caching_on", "prefix_unique_caching_off"):
        assert sc["prefix"][k]["output_tokens"] > 0
    cold = sc["coldstart"]["distllm"]
    assert cold["seconds"] > 0 and any("Engine ready" in ln for ln in cold["engine_log"])
    assert len(res["summary"]) == len(bf.SCENARIOS)
    assert "| scenario | figure | roofline fraction |" in text and "card: CPU" in text


def test_sigterm_still_prints_the_summary(tmp_path, capsys, monkeypatch):
    """`timeout` sends SIGTERM: what was measured is summarised, the parts not reached show as n/a."""
    import signal

    def measured_then_killed(self):
        self.report.put("qwen3", distllm={"output_tok_s": 16000.0, "seconds": 1.0, "roofline_fraction": 0.5,
                                          "roofline_s": 0.5})
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bf.Suite, "run_qwen3", measured_then_killed)
    monkeypatch.setattr(bf.Suite, "run_smollm2", lambda self: pytest.fail("ran after SIGTERM"))
    out = tmp_path / "r.json"
    bf.main(["--scenario", "qwen3,smollm2", "--device", "cpu", "--json", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "INTERRUPTED" in text and res["interrupted"]
    assert [r["result"] for r in res["summary"]] == ["PASS", "n/a"]
    assert signal.getsignal(signal.SIGTERM) is not bf._raise_interrupted  # handler restored


def test_bench_throughput_random_range_ratio(tmp_path, capsys):
    """`distllm bench throughput --random-range-ratio`: per-request lengths, the same for distllm and HF."""
    import argparse

    from distllm.entrypoints import bench_throughput as bt

    assert bt.random_lengths(4, 100, 0.0) == [100] * 4
    lens = bt.random_lengths(500, 100, 0.5, seed=3)
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 50 and lens == bt.random_lengths(500, 100, 0.5, 3)
    with pytest.raises(ValueError):
        bt.random_lengths(4, 100, 1.0)
    # Default path unchanged: fixed lengths, the same ids as before the option existed.
    assert bt.random_prompts(2, 5, 500) == bt.random_prompts(2, 5, 500, lengths=[5, 5])

    btd.SHAPES.setdefault("tiny", bf.TINY_SHAPE)
    folder, _ = btd.make_model_dir("tiny")
    p = argparse.ArgumentParser()
    bt.add_args(p)
    out = tmp_path / "t.json"
    args = p.parse_args(["--model", folder, "--dummy", "--device", "cpu", "--dtype", "float32", "--max-model-len", "64",
                         "--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--random-range-ratio", "0.5",
                         "--json", str(out)])
    assert bt.main(args) == 0
    res = json.loads(out.read_text())
    want = sum(bt.random_lengths(4, 8, 0.5, seed=2))
    assert res["distllm"]["output_tokens"] == want and want != 32
    assert res["hf"]["output_tok_per_s"] * res["hf"]["seconds"] == pytest.approx(want)
    assert "lengths uniform within +-50%" in capsys.readouterr().out


def test_hf_time_cap_stops_generation():
    btd.SHAPES.setdefault("tiny", bf.TINY_SHAPE)
    _, cfg = btd.make_model_dir("tiny")
    model = bf.build_hf(cfg, "cpu", "float32")
    res = bf.hf_generate_batch(model, [[100] * 8, [101] * 5], [4000, 10], "cpu", max_time=0.5)
    assert res["cut_by_time_cap"] and res["seconds"] < 5
    made = res["tokens_per_request"]
    assert 0 < made < 4000 and res["useful_tokens"] == made + min(10, made)
