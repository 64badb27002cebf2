"""Issue 5's benchmark table in one run: every scenario on dummy weights, its roofline fraction from
the ceilings measured on the same machine, and HF transformers `generate` from the same run.

    timeout -s TERM 570 python benchmarks/bench_fastpath.py --scenario all --json $OUT/fastpath.json
    python benchmarks/bench_fastpath.py --scenario decode8b,smollm2 --no-hf
    python benchmarks/bench_fastpath.py --scenario all --scale 0.25                  # a quick look

`all` takes ~8-10 min on an H100 (the caching-off side of `prefix` alone has a 55 s roofline: 2.2M
prompt tokens); SIGTERM (`timeout`) stops it and still prints the summary of what was measured.

Scenarios (`--scale` shrinks the prompt counts, never the lengths):
  coldstart  8B shape: fresh process start to the first generated token (<= 20 s); engine phases logged
  decode8b   8B shape, batch 1, in 128 / out 128: decode tok/s (>= 90% of bandwidth roofline; >= 15x HF)
  batch1000  8B shape, 1000 prompts, in 1024 / out 128 (roofline time / time >= 0.75; >= 8x HF)
  long256    8B shape, 256 prompts, in 128 / out 1024 (roofline time / time >= 0.70; >= 10x HF)
  qwen3      Qwen3-0.6B shape, 256 sequences, in and out uniform in [100, 1024], seed 0 (>= 15,000 tok/s)
  smollm2    SmolLM2-135M shape, batch 1 decode (>= 1,000 tok/s)
  prefix     8B shape, 10 prefixes of 2048 tokens x 100 prompts (+128 suffix), out 128: caching on vs off
             (>= 3x); 200 all-unique prompts of the same lengths: caching on at most 2% slower than off

Rooflines (benchmarks/roofline.py): decode = weights + KV bytes a step over the measured copy
bandwidth; throughput = prefill FLOPs over the measured bf16 matmul rate + decode bytes over the
bandwidth, decode steps counted at the engine's max_num_seqs. Batch-1 decode rates are
(N - 1) / (t(N tokens) - t(1 token)), as in bench_tp_decode.py. HF baselines run one static batch
(the largest that fits, by an estimate of its memory) under a time cap (--hf-timeout; 20 s at most
for qwen3 and smollm2, whose targets don't involve HF); a run cut by the cap reports its rate over
the tokens it made, and says so.

The 8B scenarios share one engine (prefix caching on); the caching-off side of `prefix` builds a
second one after the first is shut down. The JSON is rewritten after every measurement, so a run
that is cut short still leaves what it measured. A Markdown summary table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # roofline, bench_tp_decode
sys.path.insert(0, REPO)

import bench_tp_decode as btd  # noqa: E402
import roofline as rl  # noqa: E402

SCENARIOS = ["coldstart", "decode8b", "batch1000", "long256", "qwen3", "smollm2", "prefix"]
LLAMA_8B_SCENARIOS = ("decode8b", "batch1000", "long256", "prefix")
SHARED = "shared"  # report key for the time of builds several scenarios share
MAX_NUM_SEQS = 256  # the engine's default; the throughput rooflines count decode steps at this batch

# For CPU smoke runs (--shape-override tiny): a 2-layer, hidden-64 Llama.
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=10000.0)


# ---- options and workloads -----------------------------------------------------------------------


@dataclass
class Opts:
    device: str = "cuda"
    scale: float = 1.0  # prompt counts
    len_scale: float = 1.0  # prompt and output lengths (hidden; CPU smoke runs only)
    hf: bool = True
    hf_timeout: float = 60.0
    hf_reference_timeout: float = 20.0  # qwen3, smollm2: HF is a reference there, not part of the target
    shape_override: str | None = None
    json_path: str | None = None

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    def count(self, n: int) -> int:
        return max(1, round(n * self.scale))

    def length(self, n: int) -> int:
        # At least 16 tokens: a decode rate t(N) - t(1) needs N well above 1 to rise above noise.
        return max(16, round(n * self.len_scale))

    def shape(self, name: str) -> str:
        return self.shape_override or name

    def hf_cap(self, scenario: str) -> float:
        """Seconds an HF timed run may take: the full cap where the target is a multiple of HF."""
        if scenario in ("decode8b", "batch1000", "long256"):
            return self.hf_timeout
        return min(self.hf_timeout, self.hf_reference_timeout)


@dataclass
class Workload:
    prompts: list[list[int]]
    out_lens: list[int]
    cached_lens: list[int] | None = None  # prefix tokens an ideal prefix cache would skip (roofline)
    label: str = ""

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def max_len(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.out_lens))


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids below 100 are special tokens in most vocabularies.
    return [rng.randrange(100, vocab) for _ in range(n)]


def fixed_workload(n: int, in_len: int, out_len: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    return Workload([_tokens(rng, in_len, vocab) for _ in range(n)], [out_len] * n,
                    label=f"{n} prompts, in {in_len} / out {out_len}")


def random_len_workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> Workload:
    """Prompt and output lengths each uniform in [lo, hi] (random.Random(seed)), then the tokens."""
    rng = random.Random(seed)
    lens = [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(n)]
    return Workload([_tokens(rng, p, vocab) for p, _ in lens], [o for _, o in lens],
                    label=f"{n} sequences, in and out uniform in [{lo}, {hi}], seed {seed}")


def prefix_workload(n_prefixes: int, per_prefix: int, prefix_len: int, suffix_len: int, out_len: int,
                    vocab: int, seed: int = 0) -> Workload:
    """n_prefixes shared prefixes, per_prefix prompts each (prefix + its own suffix), shuffled so the
    groups interleave as they would in traffic. cached_lens: an ideal cache computes each prefix once."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len, vocab) for _ in range(n_prefixes)]
    items = [(g, prefixes[g] + _tokens(rng, suffix_len, vocab)) for g in range(n_prefixes) for _ in range(per_prefix)]
    rng.shuffle(items)
    seen: set[int] = set()
    cached = []
    for g, _ in items:
        cached.append(prefix_len if g in seen else 0)
        seen.add(g)
    return Workload([p for _, p in items], [out_len] * len(items), cached,
                    label=f"{n_prefixes} prefixes of {prefix_len} x {per_prefix} prompts (+{suffix_len}), out {out_len}")


# ---- results -----------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, but still print the summary of what was measured.
    A BaseException, so the per-part error handling does not swallow it."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


class Report:
    """Everything measured, keyed by scenario; rewritten to the JSON file after every change."""

    def __init__(self, path: str | None, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.data: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    def put(self, scenario: str, **kv: Any) -> None:
        self.data.setdefault(scenario, {}).update(kv)
        self.save()

    def add_time(self, scenario: str, seconds: float) -> None:
        d = self.data.setdefault(scenario, {})
        d["elapsed_s"] = d.get("elapsed_s", 0.0) + seconds
        self.save()

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.header, "scenarios": self.data, "summary": self.rows}, f, indent=2, default=str)
        os.replace(tmp, self.path)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- distllm side ----------------------------------------------------------------------------------


def build_llm(folder: str, opts: Opts, max_model_len: int, prefix_caching: bool = True) -> Any:
    from distllm import LLM

    t = time.perf_counter()
    llm = LLM(model=folder, load_format="dummy", dtype=opts.dtype, device=opts.device, max_model_len=max_model_len,
              max_num_seqs=MAX_NUM_SEQS, enable_prefix_caching=prefix_caching)
    log(f"  engine built in {time.perf_counter() - t:.1f} s (max_model_len {max_model_len}, "
        f"prefix caching {'on' if prefix_caching else 'off'})")
    return llm


def close_llm(llm: Any) -> None:
    """Shut the engine down and give its GPU memory back before the next one (or HF) loads."""
    llm.shutdown()
    # The engine gc.freeze()s its start-up objects; frozen cycles (model, KV cache, graphs) would
    # never be collected, so unfreeze before collecting.
    gc.unfreeze()
    release_memory()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        log(f"  GPU memory still allocated: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")


def _sampling(out_lens: Sequence[int]) -> Any:
    from distllm import SamplingParams

    if len(set(out_lens)) == 1:
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=out_lens[0])
    return [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=o) for o in out_lens]


def warm_up(llm: Any, lengths: Sequence[int], vocab: int) -> None:
    """A few short generations at the lengths to come (kernels compile, allocator grows), then an
    empty prefix cache so no warm-up prompt is reused."""
    rng = random.Random(12345)
    prompts = [{"prompt_token_ids": _tokens(rng, n, vocab)} for n in lengths]
    llm.generate(prompts, _sampling([4]), use_tqdm=False)
    # A batch of 16 short ones: batched decode steps.
    llm.generate([{"prompt_token_ids": _tokens(rng, 16, vocab)} for _ in range(16)], _sampling([8]), use_tqdm=False)
    llm.reset_prefix_cache()


def timed_generate(llm: Any, wl: Workload) -> dict[str, Any]:
    """Wall time of one llm.generate over the workload, and the output tokens it made."""
    llm.reset_prefix_cache()
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    t = time.perf_counter()
    outs = llm.generate(prompts, _sampling(wl.out_lens), use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    expected = sum(wl.out_lens)
    if n_out != expected:
        log(f"  WARNING: {n_out} output tokens, expected {expected} (ignore_eos)")
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + sum(wl.prompt_lens)) / dt, "requests": len(wl.prompts)}


def decode_rate(gen: Callable[[int], float], n_tokens: int, reps_1: int = 3, reps_n: int = 2) -> dict[str, float]:
    """(N - 1) / (t(N) - t(1)): prefill and first token timed apart and subtracted. `gen(n)` runs one
    batch-1 generation of n tokens and returns its wall time."""
    gen(min(8, n_tokens))  # warm-up
    t1 = min(gen(1) for _ in range(reps_1))
    tn = min(gen(n_tokens) for _ in range(reps_n))
    return {"tok_s": _rate(n_tokens, t1, tn), "t1_s": t1, "tn_s": tn, "tokens": n_tokens}


def _rate(n_tokens: int, t1: float, tn: float) -> float:
    if tn <= t1:  # only timing noise does this (a loaded CPU); no rate rather than a negative one
        log(f"  WARNING: t({n_tokens} tokens) {tn:.4f} s <= t(1 token) {t1:.4f} s: no decode rate")
        return math.nan
    return (n_tokens - 1) / (tn - t1)


def distllm_decode_rate(llm: Any, prompt: list[int], n_tokens: int) -> dict[str, float]:
    from distllm import SamplingParams

    def gen(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        return time.perf_counter() - t

    return decode_rate(gen, n_tokens)


# ---- HF transformers side ---------------------------------------------------------------------------


def build_hf(cfg: dict, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.perf_counter()
    skip = ("architectures", "model_type", "torch_dtype")
    hcfg = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k not in skip})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hcfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    log(f"  HF model built in {time.perf_counter() - t:.1f} s")
    return model


def release_memory() -> None:
    """Collect what was dropped and hand cached GPU blocks back, so the next engine's memory
    profile sees the card free. Callers drop their last reference first."""
    gc.collect()
    _empty_cuda_cache()


def choose_hf_batch(cfg: dict, n_prompts: int, max_prompt: int, max_out: int, free_bytes: int,
                    dtype_bytes: int = 2, headroom: float = 0.8) -> int:
    """Largest power-of-two static batch (<= n_prompts) whose estimated memory fits in `free_bytes`
    (free with the model already loaded): per sequence its KV cache, one layer's prefill
    activations (MLP, residuals), a materialised attention matrix (in case sdpa falls back to math
    with a padding mask) and fp32 logits of the last position."""
    per_seq = ((max_prompt + max_out) * rl.kv_bytes_per_token(cfg, dtype_bytes)
               + max_prompt * (3 * cfg["intermediate_size"] + 4 * cfg["hidden_size"]) * dtype_bytes
               + cfg["num_attention_heads"] * max_prompt * max_prompt * dtype_bytes
               + 2 * cfg["vocab_size"] * 4)
    fits = int(headroom * free_bytes // per_seq)
    if fits < 1:
        return 1
    return 1 << (min(fits, n_prompts).bit_length() - 1)


def free_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate_batch(model: Any, prompts: list[list[int]], out_lens: list[int], device: str,
                      max_time: float) -> dict[str, Any]:
    """One static batch through HF generate, left-padded, until the longest output or the time cap.
    Useful tokens: each request's own output length at most (static batching runs all to the max)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    max_new = max(out_lens)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=0, max_time=max_time)
    _sync(device)
    dt = time.perf_counter() - t
    made = out.shape[1] - width
    useful = sum(min(o, made) for o in out_lens)
    return {"seconds": dt, "tokens_per_request": made, "max_new_tokens": max_new, "useful_tokens": useful,
            "tok_s": useful / dt, "cut_by_time_cap": made < max_new}


def hf_throughput(model: Any, cfg: dict, wl: Workload, opts: Opts, cap: float) -> dict[str, Any]:
    """HF rate on one static batch from the workload: the largest that fits (halved on OOM), run
    for at most `cap` seconds."""
    import torch

    batch = choose_hf_batch(cfg, len(wl.prompts), max(wl.prompt_lens), max(wl.out_lens), free_memory(opts.device),
                            opts.dtype_bytes)
    # Warm-up: kernels, cuBLAS handles.
    hf_generate_batch(model, wl.prompts[:1], [2], opts.device, cap)
    while True:
        try:
            res = hf_generate_batch(model, wl.prompts[:batch], wl.out_lens[:batch], opts.device, cap)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # Outside the handler: the exception's frames (and the activations they hold) are gone.
        batch //= 2
        release_memory()
        log(f"  HF out of memory; retrying with batch {batch}")
    res["batch"] = batch
    res["note"] = f"HF rate on a subset of {batch} prompts (one static batch)"
    if res["cut_by_time_cap"]:
        res["note"] += (f", stopped by the {cap:.0f} s cap after {res['tokens_per_request']} of "
                        f"{res['max_new_tokens']} new tokens")
    log(f"  HF generate: {res['tok_s']:.1f} output tok/s ({res['note']}; {res['seconds']:.1f} s)")
    return res


def hf_decode_rate(model: Any, prompt: list[int], n_tokens: int, device: str, max_time: float) -> dict[str, Any]:
    """Batch-1 HF decode rate as (N - 1) / (t(N) - t(1)); N shrinks if N tokens would pass the cap."""
    import torch

    x = torch.tensor([prompt], device=device)
    m = torch.ones_like(x)

    def gen(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=m, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t

    t_start = time.perf_counter()
    gen(2)  # warm-up
    t1 = min(gen(1) for _ in range(2))
    per_token = max((gen(8) - t1) / 7, 1e-6)
    left = max_time - (time.perf_counter() - t_start) - t1
    n = min(n_tokens, max(8, int(0.8 * left / per_token)))
    tn = gen(n)
    res = {"tok_s": _rate(n, t1, tn), "t1_s": t1, "tn_s": tn, "tokens": n}
    res["note"] = "HF batch 1" + ("" if n == n_tokens else f", {n} tokens (time cap)")
    log(f"  HF generate batch 1: {res['tok_s']:.1f} decode tok/s ({res['note']})")
    return res


# ---- the suite ---------------------------------------------------------------------------------------


COLD_CHILD = r"""
import time
T0 = time.time()
import json, sys
from distllm import LLM, SamplingParams
T1 = time.time()
a = json.loads(sys.argv[1])
llm = LLM(model=a["folder"], load_format="dummy", dtype=a["dtype"], device=a["device"], max_model_len=a["max_model_len"])
T2 = time.time()
llm.generate([{"prompt_token_ids": a["prompt"]}], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
             use_tqdm=False)
T3 = time.time()
print("COLDSTART " + json.dumps({"python_up": T0, "imported": T1, "engine_ready": T2, "first_token": T3}), flush=True)
llm.shutdown()
"""


def triton_cache_entries() -> int:
    """Kernels already in Triton's on-disk cache: with none, a cold start also compiles them."""
    path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def cold_start(folder: str, opts: Opts, max_model_len: int, vocab: int, timeout: float = 240.0) -> dict[str, Any]:
    """Fresh process: wall time from spawning it (before `import distllm`) to its first token."""
    cache_before = triton_cache_entries()
    env = dict(os.environ, DISTLLM_LOGGING_LEVEL="INFO", PYTHONPATH=os.pathsep.join(
        [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    arg = json.dumps({"folder": folder, "dtype": opts.dtype, "device": opts.device, "max_model_len": max_model_len,
                      "prompt": _tokens(random.Random(1), min(128, max_model_len // 2), vocab)})
    t_spawn = time.time()
    proc = subprocess.run([sys.executable, "-c", COLD_CHILD, arg], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)
    info = [ln for ln in proc.stderr.splitlines() if ln.startswith(("INFO", "WARNING", "ERROR"))]
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLDSTART ")]
    if proc.returncode != 0 or not marks:
        raise RuntimeError(f"cold-start child failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    m = json.loads(marks[-1].split(" ", 1)[1])
    return {"seconds": m["first_token"] - t_spawn,
            "phases_s": {"interpreter start": m["python_up"] - t_spawn, "import distllm": m["imported"] - m["python_up"],
                         "LLM(...) engine build": m["engine_ready"] - m["imported"],
                         "first token (generate)": m["first_token"] - m["engine_ready"]},
            "engine_log": info, "max_model_len": max_model_len, "triton_cache_entries_before": cache_before}


class Suite:
    def __init__(self, opts: Opts, report: Report, ceilings: rl.Ceilings):
        self.opts = opts
        self.report = report
        self.ceil = ceilings
        self.folders: dict[str, tuple[str, dict]] = {}
        self._wl8b: dict[str, Workload] | None = None

    # -- helpers

    def model(self, shape: str) -> tuple[str, dict]:
        shape = self.opts.shape(shape)
        if shape not in self.folders:
            self.folders[shape] = btd.make_model_dir(shape)
        return self.folders[shape]

    def guarded(self, scenario: str, what: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is recorded and the suite goes on with the next part."""
        t = time.perf_counter()
        log(f"\n== {scenario}: {what}")
        failed = False
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one scenario's failure must not lose the others
            traceback.print_exc()
            self.report.put(scenario, **{f"error ({what})": f"{type(e).__name__}: {e}"})
            failed = True
        if failed:  # outside the handler, once the traceback's frames (and their tensors) are gone
            release_memory()
        dt = time.perf_counter() - t
        self.report.add_time(scenario, dt)
        log(f"   ({what}: {dt:.1f} s)")

    def roofline_time(self, cfg: dict, wl: Workload, cached: bool = False) -> float:
        return rl.roofline_time(cfg, wl.prompt_lens, wl.out_lens, self.ceil, MAX_NUM_SEQS,
                                wl.cached_lens if cached else None, self.opts.dtype_bytes)

    def vocab(self, cfg: dict) -> int:
        return cfg["vocab_size"]

    # -- workloads (shared by distllm and HF)

    def workloads_8b(self, cfg: dict) -> dict[str, Workload]:
        if self._wl8b is None:  # millions of random ids: built once, shared by distllm and HF
            self._wl8b = self._make_workloads_8b(cfg)
        return self._wl8b

    def _make_workloads_8b(self, cfg: dict) -> dict[str, Workload]:
        o, v = self.opts, self.vocab(cfg)
        return {
            "decode8b": fixed_workload(1, o.length(128), o.length(128), v, seed=1),
            "batch1000": fixed_workload(o.count(1000), o.length(1024), o.length(128), v, seed=2),
            "long256": fixed_workload(o.count(256), o.length(128), o.length(1024), v, seed=3),
            "prefix": prefix_workload(10, o.count(100), o.length(2048), o.length(128), o.length(128), v, seed=4),
            "prefix_unique": fixed_workload(o.count(200), o.length(2048) + o.length(128), o.length(128), v, seed=5),
        }

    # -- 8B, one engine with prefix caching on

    def run_8b(self, scenarios: list[str]) -> None:
        folder, cfg = self.model("llama3-8b")
        wls = self.workloads_8b(cfg)
        wanted = {s: w for s, w in wls.items() if s.split("_")[0] in scenarios}
        llm = None

        def build() -> None:
            nonlocal llm
            llm = build_llm(folder, self.opts, max(w.max_len for w in wanted.values()))
            warm_up(llm, sorted({max(w.prompt_lens) for w in wanted.values()}), self.vocab(cfg))

        self.guarded(SHARED, "8B engine build + warm-up (shared by the 8B scenarios)", build)
        if llm is None:
            return
        try:
            if "decode8b" in scenarios:
                self.guarded("decode8b", "distllm", lambda: self._decode(llm, cfg, "decode8b", wanted["decode8b"]))
            for s in ("batch1000", "long256"):
                if s in scenarios:
                    self.guarded(s, "distllm", lambda s=s: self._throughput(llm, cfg, s, wanted[s]))
            if "prefix" in scenarios:
                self.guarded("prefix", "distllm, caching on", lambda: self._prefix(llm, cfg, wanted, "on"))
        finally:
            close_llm(llm)

    def run_8b_prefix_off(self) -> None:
        folder, cfg = self.model("llama3-8b")
        wls = self.workloads_8b(cfg)
        wanted = {"prefix": wls["prefix"], "prefix_unique": wls["prefix_unique"]}

        def go() -> None:
            llm = build_llm(folder, self.opts, max(w.max_len for w in wanted.values()), prefix_caching=False)
            try:
                warm_up(llm, sorted({max(w.prompt_lens) for w in wanted.values()}), self.vocab(cfg))
                self._prefix(llm, cfg, wanted, "off")
            finally:
                close_llm(llm)

        self.guarded("prefix", "distllm, caching off (second engine)", go)

    def _decode(self, llm: Any, cfg: dict, scenario: str, wl: Workload) -> None:
        prompt, n = wl.prompts[0], wl.out_lens[0]
        res = distllm_decode_rate(llm, prompt, n)
        roof = rl.decode_roofline_tok_s(cfg, len(prompt), n, self.ceil.bandwidth, self.opts.dtype_bytes)
        res.update(roofline_tok_s=roof, roofline_fraction=res["tok_s"] / roof,
                   workload=f"batch 1, in {len(prompt)} / out {n}")
        self.report.put(scenario, distllm=res)
        log(f"  distllm: {res['tok_s']:.1f} decode tok/s; bandwidth roofline {roof:.1f} tok/s -> "
            f"{res['roofline_fraction']:.1%}")

    def _throughput(self, llm: Any, cfg: dict, scenario: str, wl: Workload) -> None:
        res = timed_generate(llm, wl)
        roof = self.roofline_time(cfg, wl)
        res.update(roofline_s=roof, roofline_fraction=roof / res["seconds"], workload=wl.label)
        self.report.put(scenario, distllm=res)
        log(f"  distllm: {wl.label}: {res['seconds']:.2f} s, {res['output_tok_s']:.1f} output tok/s "
            f"({res['total_tok_s']:.1f} total); roofline {roof:.2f} s -> {res['roofline_fraction']:.1%}")

    def _prefix(self, llm: Any, cfg: dict, wls: dict[str, Workload], caching: str) -> None:
        for key in ("prefix", "prefix_unique"):
            if key not in wls:
                continue
            wl = wls[key]
            res = timed_generate(llm, wl)
            roof = self.roofline_time(cfg, wl, cached=(caching == "on"))
            res.update(roofline_s=roof, roofline_fraction=roof / res["seconds"], workload=wl.label)
            self.report.put("prefix", **{f"{key}_caching_{caching}": res})
            log(f"  caching {caching}, {wl.label}: {res['seconds']:.2f} s, {res['output_tok_s']:.1f} output tok/s; "
                f"roofline {roof:.2f} s -> {res['roofline_fraction']:.1%}")

    # -- HF for the 8B scenarios (one model for all three)

    def run_8b_hf(self, scenarios: list[str]) -> None:
        folder, cfg = self.model("llama3-8b")
        wls = self.workloads_8b(cfg)
        wanted = [s for s in ("decode8b", "batch1000", "long256") if s in scenarios]
        if not wanted:
            return
        box: list[Any] = []  # the only reference to the model, so clearing it frees the GPU memory
        self.guarded(SHARED, "HF 8B model build (shared by the 8B scenarios)",
                     lambda: box.append(build_hf(cfg, self.opts.device, self.opts.dtype)))
        if not box:
            return
        try:
            if "decode8b" in wanted:
                wl = wls["decode8b"]
                self.guarded("decode8b", "HF", lambda: self.report.put("decode8b", hf=hf_decode_rate(
                    box[0], wl.prompts[0], wl.out_lens[0], self.opts.device, self.opts.hf_cap("decode8b"))))
            for s in ("batch1000", "long256"):
                if s in wanted:
                    self.guarded(s, "HF", lambda s=s: self.report.put(
                        s, hf=hf_throughput(box[0], cfg, wls[s], self.opts, self.opts.hf_cap(s))))
        finally:
            box.clear()
            release_memory()

    # -- small models

    def run_qwen3(self) -> None:
        folder, cfg = self.model("qwen3-0.6b")
        o = self.opts
        wl = random_len_workload(o.count(256), o.length(100), o.length(1024), self.vocab(cfg), seed=0)

        def go() -> None:
            llm = build_llm(folder, o, wl.max_len)
            try:
                warm_up(llm, [max(wl.prompt_lens), min(wl.prompt_lens)], self.vocab(cfg))
                self._throughput(llm, cfg, "qwen3", wl)
            finally:
                close_llm(llm)

        self.guarded("qwen3", "distllm", go)
        if o.hf:
            self.guarded("qwen3", "HF", lambda: self._hf_small(cfg, lambda m: self.report.put(
                "qwen3", hf=hf_throughput(m, cfg, wl, o, o.hf_cap("qwen3")))))

    def run_smollm2(self) -> None:
        folder, cfg = self.model("smollm2-135m")
        o = self.opts
        wl = fixed_workload(1, o.length(128), o.length(256), self.vocab(cfg), seed=6)

        def go() -> None:
            llm = build_llm(folder, o, wl.max_len + 16)
            try:
                self._decode(llm, cfg, "smollm2", wl)
            finally:
                close_llm(llm)

        self.guarded("smollm2", "distllm", go)
        if o.hf:
            self.guarded("smollm2", "HF", lambda: self._hf_small(cfg, lambda m: self.report.put(
                "smollm2", hf=hf_decode_rate(m, wl.prompts[0], wl.out_lens[0], o.device, o.hf_cap("smollm2")))))

    def _hf_small(self, cfg: dict, fn: Callable[[Any], None]) -> None:
        box = [build_hf(cfg, self.opts.device, self.opts.dtype)]
        try:
            fn(box[0])
        finally:
            box.clear()
            release_memory()

    # -- cold start

    def run_coldstart(self) -> None:
        folder, cfg = self.model("llama3-8b")

        def go() -> None:
            res = cold_start(folder, self.opts, min(2048, cfg["max_position_embeddings"]), self.vocab(cfg))
            self.report.put("coldstart", distllm=res)
            log(f"  process start -> first token: {res['seconds']:.2f} s (max_model_len {res['max_model_len']}; "
                f"{res['triton_cache_entries_before']} entries in Triton's kernel cache before: 0 means the time "
                "includes compiling them)")
            for k, v in res["phases_s"].items():
                log(f"    {k:<24} {v:7.2f} s")
            log("  engine log:")
            for ln in res["engine_log"]:
                log(f"    {ln}")

        self.guarded("coldstart", "fresh process, 1-token generation", go)


# ---- verdicts and the summary table ------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    figure: str
    roofline: str
    hf: str
    target: str
    result: str = ""
    elapsed_s: float = 0.0
    checks: dict[str, bool | None] = field(default_factory=dict)  # None: not measured


def _verdict(checks: dict[str, bool | None]) -> str:
    known = {k: v for k, v in checks.items() if v is not None}
    if not known:
        return "n/a"
    word = "PASS" if all(known.values()) else "MISS"
    missing = [k for k, v in checks.items() if v is None]
    return word + (f" (not measured: {', '.join(missing)})" if missing else "")


def _at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def _speedup(ours: float | None, hf: dict | None) -> float | None:
    if ours is None or not hf or not hf.get("tok_s"):
        return None
    return ours / hf["tok_s"]


def _hf_text(hf: dict | None, speedup: float | None) -> str:
    if not hf:
        return "not run"
    text = f"{hf['tok_s']:,.1f} tok/s ({hf.get('note', '')})"
    return text + (f" -> {speedup:.2f}x" if speedup else "")


def _decode_row(scenario: str, d: dict[str, Any], card: str) -> Row:
    ds, hf = d.get("distllm"), d.get("hf")
    rate = ds["tok_s"] if ds else None
    sp = _speedup(rate, hf)
    row = Row(scenario, f"{rate:,.1f} decode tok/s" if ds else "-",
              f"{ds['roofline_fraction']:.1%} of {ds['roofline_tok_s']:,.0f} tok/s" if ds else "-", _hf_text(hf, sp), "")
    if scenario == "decode8b":
        row.target = ">= 90% of bandwidth roofline; >= 15x HF"
        row.checks = {"roofline": _at_least(ds and ds["roofline_fraction"], 0.90), "HF": _at_least(sp, 15)}
    else:
        row.target = ">= 1,000 tok/s"
        row.checks = {"rate": _at_least(rate, 1000)}
    return row


THROUGHPUT_GOALS = {"batch1000": (0.75, 8), "long256": (0.70, 10)}  # roofline fraction, x HF


def _throughput_row(scenario: str, d: dict[str, Any], card: str) -> Row:
    ds, hf = d.get("distllm"), d.get("hf")
    rate = ds["output_tok_s"] if ds else None
    sp = _speedup(rate, hf)
    row = Row(scenario, f"{rate:,.0f} output tok/s ({ds['seconds']:.1f} s)" if ds else "-",
              f"{ds['roofline_fraction']:.1%} (roofline {ds['roofline_s']:.1f} s)" if ds else "-", _hf_text(hf, sp), "")
    if scenario in THROUGHPUT_GOALS:
        frac, times = THROUGHPUT_GOALS[scenario]
        row.target = f"roofline time / time >= {frac:.2f}; >= {times}x HF"
        row.checks = {"roofline": _at_least(ds and ds["roofline_fraction"], frac), "HF": _at_least(sp, times)}
    else:
        row.target = ">= 15,000 output tok/s on an H100" + ("" if "H100" in card else f" (this card: {card})")
        row.checks = {"rate": _at_least(rate, 15000)}
    return row


def _prefix_row(scenario: str, d: dict[str, Any], card: str) -> Row:
    on, off = d.get("prefix_caching_on"), d.get("prefix_caching_off")
    uon, uoff = d.get("prefix_unique_caching_on"), d.get("prefix_unique_caching_off")
    gain = on["output_tok_s"] / off["output_tok_s"] if on and off else None
    # Time with caching on over time off, minus 1: how much slower caching makes an all-miss workload.
    slow = uoff["output_tok_s"] / uon["output_tok_s"] - 1 if uon and uoff else None
    fig = (f"shared: {gain:.2f}x caching off" if gain else "shared: -") + "; " + (
        f"0% hits: {slow:+.1%} time vs off" if slow is not None else "0% hits: -")
    roof = f"{on['roofline_fraction']:.1%} with caching (ideal reuse)" if on else "-"
    checks = {"3x": _at_least(gain, 3), "0% hits": None if slow is None else slow <= 0.02}
    return Row(scenario, fig, roof, "n/a", ">= 3x caching off; 0% hits <= 2% slower", checks=checks)


def _coldstart_row(scenario: str, d: dict[str, Any], card: str) -> Row:
    s = d["distllm"]["seconds"] if d.get("distllm") else None
    return Row(scenario, f"{s:.1f} s to first token" if s is not None else "-", "n/a", "n/a", "<= 20 s",
               checks={"time": None if s is None else s <= 20})


ROW_BUILDERS: dict[str, Callable[[str, dict[str, Any], str], Row]] = {
    "decode8b": _decode_row, "smollm2": _decode_row, "batch1000": _throughput_row, "long256": _throughput_row,
    "qwen3": _throughput_row, "prefix": _prefix_row, "coldstart": _coldstart_row,
}


def make_row(scenario: str, d: dict[str, Any], card: str) -> Row:
    """Figure, roofline fraction, HF, target and verdict of one scenario from what was measured."""
    row = ROW_BUILDERS[scenario](scenario, d, card)
    errors = "; ".join(f"{k}: {v}" for k, v in d.items() if k.startswith("error"))
    row.result = _verdict(row.checks) + (f"; errors: {errors}" if errors else "")
    row.elapsed_s = d.get("elapsed_s", 0.0)
    return row


def markdown_table(rows: list[Row]) -> str:
    lines = ["| scenario | figure | roofline fraction | HF transformers (same run) | target | result |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.scenario} | {r.figure} | {r.roofline} | {r.hf} | {r.target} | {r.result} |" for r in rows]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------


def card_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def parse_scenarios(text: str) -> list[str]:
    names = SCENARIOS if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad:
        raise SystemExit(f"unknown scenario(s) {bad}; choose from {SCENARIOS} or all")
    return names


def run_parts(suite: Suite, opts: Opts, scenarios: list[str]) -> None:
    # Order: the cold start first (a process of its own, before this one holds GPU memory); then the
    # 8B engine and HF's 8B model; the small models; the caching-off 8B engine last, as the longest part.
    if "coldstart" in scenarios:
        suite.run_coldstart()
    eight = [s for s in scenarios if s in LLAMA_8B_SCENARIOS]
    if eight:
        suite.run_8b(eight)
        if opts.hf:
            suite.run_8b_hf(eight)
    if "qwen3" in scenarios:
        suite.run_qwen3()
    if "smollm2" in scenarios:
        suite.run_smollm2()
    if "prefix" in scenarios:
        suite.run_8b_prefix_off()


def run(opts: Opts, scenarios: list[str]) -> list[Row]:
    import torch

    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a (meaningless but working) CPU run")
    if opts.shape_override == "tiny":
        btd.SHAPES.setdefault("tiny", TINY_SHAPE)
    t_all = time.perf_counter()
    card = card_name(opts.device)
    log(f"card: {card}")
    ceil = rl.measure_ceilings(opts.device)
    log(f"measured: copy bandwidth {ceil.bandwidth / 1e12:.2f} TB/s, matmul {ceil.matmul_rate / 1e12:.0f} TFLOP/s"
        + (f"  [{ceil.note}]" if ceil.note else ""))
    if opts.scale != 1.0 or opts.len_scale != 1.0:
        log(f"NOTE: --scale {opts.scale} / length scale {opts.len_scale}: not issue 5's workloads; verdicts are indicative")
    header = {"card": card, "ceilings": asdict(ceil), "opts": asdict(opts), "scenarios_run": scenarios}
    report = Report(opts.json_path, header)
    suite = Suite(opts, report, ceil)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run_parts(suite, opts, scenarios)
    except (Interrupted, KeyboardInterrupt) as e:
        log(f"\nINTERRUPTED ({type(e).__name__} {e}): the summary covers what was measured before")
        report.header["interrupted"] = f"{type(e).__name__} {e}"
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = [make_row(s, report.data.get(s, {}), card) for s in scenarios]
    report.rows = [asdict(r) for r in rows]
    report.header["total_s"] = time.perf_counter() - t_all
    report.save()
    log(f"\ncard: {card}; copy bandwidth {ceil.bandwidth / 1e12:.2f} TB/s, matmul {ceil.matmul_rate / 1e12:.0f} TFLOP/s "
        f"(measured in this run); total {time.perf_counter() - t_all:.0f} s"
        + (f"; --scale {opts.scale}: prompt counts shrunk, not issue 5's workloads" if opts.scale != 1.0 else ""))
    shared_s = report.data.get(SHARED, {}).get("elapsed_s")
    log("time: " + ", ".join(f"{r.scenario} {r.elapsed_s:.0f} s" for r in rows)
        + (f", shared 8B builds {shared_s:.0f} s" if shared_s is not None else ""))
    shared_errors = {k: v for k, v in report.data.get(SHARED, {}).items() if k.startswith("error")}
    for k, v in shared_errors.items():
        log(f"{SHARED} {k}: {v}")
    log("\n" + markdown_table(rows))
    if shared_errors:  # a failed shared build leaves its scenarios unmeasured: make the exit status say so
        rows.append(Row(SHARED, "-", "-", "-", "-", result="errors: " + "; ".join(shared_errors)))
    return rows


def parse_args(argv: list[str] | None = None) -> tuple[Opts, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", help=f"all, or a comma list of {SCENARIOS}")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    ap.add_argument("--hf-timeout", type=float, default=60.0,
                    help="cap on each HF timed run, seconds (qwen3 and smollm2, where HF is only a reference: "
                         "at most 20 s)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink prompt counts, in (0, 1]")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every measurement)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke runs
    ap.add_argument("--shape-override", default=None, choices=["tiny"], help=argparse.SUPPRESS)
    ap.add_argument("--len-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not 0 < a.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    opts = Opts(device=a.device, scale=a.scale, len_scale=a.len_scale, hf=not a.no_hf, hf_timeout=a.hf_timeout,
                shape_override=a.shape_override, json_path=a.json)
    return opts, parse_scenarios(a.scenario)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts, scenarios = parse_args(argv)
    rows = run(opts, scenarios)
    return 0 if all("error" not in r.result for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
