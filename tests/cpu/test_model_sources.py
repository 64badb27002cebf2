"""Model sources and their errors: sharded safetensors, dummy weights, bad paths and files,
remote code; EngineArgs validation and CLI round trip; `import distllm` stays light."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distllm import EngineArgs, LLM, SamplingParams


def _greedy(folder: str, **kw) -> list[int]:
    with LLM(model=folder, device="cpu", **kw) as llm:
        out = llm.generate({"prompt_token_ids": [11, 22, 33, 44]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        return out[0].outputs[0].token_ids


def test_sharded_safetensors_folder_loads(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models["qwen2"]
    dst = tmp_path / "sharded"
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(dst, safe_serialization=True, max_shard_size="2MB")
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(src, f), dst / f)
    shards = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (dst / "model.safetensors.index.json").exists()
    assert _greedy(str(dst)) == _greedy(src)


def test_dummy_weights_from_config_alone(tiny_models, tmp_path):
    folder = tmp_path / "cfg_only"
    folder.mkdir()
    for f in os.listdir(tiny_models["llama"]):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_models["llama"], f), folder / f)
    toks = _greedy(str(folder), load_format="dummy")
    assert len(toks) == 6


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineArgs(model="/no/such/model/dir").create_engine_config()


def test_missing_config_and_missing_weights(tiny_models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        EngineArgs(model=str(empty)).create_engine_config()
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_models["llama"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*never unpickles"):
        LLM(model=str(no_weights), device="cpu")


def test_missing_shard_named(tiny_models, tmp_path):
    d = tmp_path / "missing_shard"
    shutil.copytree(tiny_models["llama"], d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LLM(model=str(d), device="cpu")


def test_corrupt_safetensors(tiny_models, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_models["llama"], d)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(d), device="cpu")
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(d), device="cpu")


def test_folder_without_tokenizer(tiny_models, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_models["llama"], f), d / f)
    with pytest.raises(ValueError, match="cannot load the tokenizer.*tokenizer="):
        LLM(model=str(d), device="cpu")


def test_unknown_architecture(tiny_models, tmp_path):
    d = tmp_path / "unknown"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNetForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNetForCausalLM.*not supported.*LlamaForCausalLM"):
        EngineArgs(model=str(d)).create_engine_config()


def test_remote_code_model(tiny_models, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MyCustomModel"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.MyCustomModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs remote code.*trust_remote_code"):
        EngineArgs(model=str(d)).create_engine_config()
    with pytest.raises(NotImplementedError, match="does not execute model code"):
        EngineArgs(model=str(d), trust_remote_code=True).create_engine_config()
    assert EngineArgs().trust_remote_code is False


def test_max_model_len_over_model_limit(tiny_models):
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) is larger than the model's maximum length \(512"):
        EngineArgs(model=tiny_models["llama"], max_model_len=4096).create_engine_config()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(dtype="int3"), "dtype must be one of"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1, got 0"),
        (dict(distributed_executor_backend="slurm"), "distributed_executor_backend must be one of"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
        (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be in \(0, 1\]"),
        (dict(block_size=12), "block_size must be one of 8, 16, 32, 64, 128, got 12"),
        (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be >= 1, got 0"),
        (dict(max_model_len=0), "max_model_len must be >= 1, got 0"),
        (dict(cpu_offload_gb=-1), "cpu_offload_gb must be >= 0, got -1"),
        (dict(load_format="pt"), "load_format must be one of"),
        (dict(runner="train"), "runner must be one of"),
        (dict(quantization="awq"), "quantization must be one of"),
        (dict(scheduling_policy="lifo"), "scheduling_policy must be one of"),
    ],
)
def test_engine_args_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        EngineArgs(**kwargs)


def test_engine_args_cli_round_trip():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--model", "m", "--dtype", "bfloat16", "--max-model-len", "1024", "-tp", "2", "--block-size", "32",
         "--no-enable-prefix-caching", "--enforce-eager", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.5"]
    )
    ea = EngineArgs.from_cli_args(args)
    assert (ea.model, ea.dtype, ea.max_model_len, ea.tensor_parallel_size, ea.block_size) == ("m", "bfloat16", 1024, 2, 32)
    assert ea.enable_prefix_caching is False and ea.enforce_eager is True and ea.max_num_seqs == 8
    assert ea.gpu_memory_utilization == 0.5 and ea.trust_remote_code is False


def test_import_is_light():
    code = (
        "import sys, distllm\n"
        "from distllm import SamplingParams\n"
        "SamplingParams(temperature=0.5)\n"
        "heavy = [m for m in ('torch', 'transformers', 'triton', 'ray', 'zmq') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import distllm pulled in: {out.stdout.strip()}"
