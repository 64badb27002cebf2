"""The CLI and the examples on the embedded default model (SmolLM2-135M-Instruct), as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args: list[str], stdin: str | None = None, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def test_cli_generate_default_model():
    out = run([sys.executable, "-m", "distllm", "generate", "The capital of France is", "--max-tokens", "8",
               "--temperature", "0", "--max-model-len", "1024"])
    assert "Paris" in out


def test_cli_chat_runs_on_default_model():
    out = run(
        [sys.executable, "-m", "distllm", "chat", "--max-tokens", "12", "--temperature", "0", "--max-model-len", "1024"],
        stdin="What is the capital of France?\nAnd of Germany?\n/exit\n",
    )
    assert "Paris" in out


def test_chat_loop_keeps_history():
    import io
    from types import SimpleNamespace

    from distllm.entrypoints.cli import chat_loop

    seen = []

    class FakeLLM:
        def chat(self, messages, sp, use_tqdm=False):
            seen.append([dict(m) for m in messages])
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"reply {len(seen)}")])]

    out = io.StringIO()
    chat_loop(FakeLLM(), None, io.StringIO("first\n\nsecond\n/exit\nnever\n"), out, system="be brief")
    assert out.getvalue() == "reply 1\nreply 2\n"
    assert seen[1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": "second"},
    ]


def test_cli_reports_bad_arguments():
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "distllm", "generate", "hi", "--temperature", "-1", "--max-model-len", "256"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 2 and "temperature must be non-negative" in p.stderr


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("basic.py", [], "Generated Outputs"),
        ("generate.py", ["--max-tokens", "8", "--temperature", "0", "--max-model-len", "1024"], "Generated text"),
        ("chat.py", ["--max-tokens", "16", "--max-model-len", "1024"], "Generated text"),
        ("llm_engine_example.py", ["--max-model-len", "1024"], "RequestOutput"),
        ("prefix_caching.py", [], "Generated answers are the same: True"),
    ],
)
def test_examples_run(script, args, expect):
    out = run([sys.executable, os.path.join(ROOT, "examples", script), *args])
    assert expect in out
