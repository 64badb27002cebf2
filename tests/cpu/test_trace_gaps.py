"""benchmarks/trace_gaps.py on a small hand-made trace: busy time, span, short and long gaps."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trace_gaps.py"


def test_busy_span_and_gaps(tmp_path):
    events = [
        {"cat": "kernel", "name": "norm", "ts": 0, "dur": 5},
        {"cat": "kernel", "name": "gemv", "ts": 6, "dur": 4},  # 1 us launch gap
        {"cat": "cpu_op", "name": "aten::mm", "ts": 20, "dur": 100},  # not a GPU event
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 210, "dur": 5},  # 200 us host gap
    ]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=True).stdout
    assert "3 GPU events, busy 14 us, span 215 us" in out
    assert "1.00 us each): norm -> gemv" in out
    assert "long gap 200 us: gemv -> Memcpy HtoD" in out


def test_no_gpu_events_is_a_clear_error(tmp_path):
    path = tmp_path / "cpu_only.json"
    path.write_text(json.dumps([{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]))
    r = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)
    assert r.returncode != 0 and "no GPU events" in r.stderr


def test_chain_table_by_kernel_and_grid(tmp_path):
    """--kernels: what each kernel adds to the chain, its end minus the previous end, by name
    and grid; overlapping kernels (PDL) count only what they add past the one before."""
    events = [
        {"cat": "kernel", "name": "gemv", "ts": 0, "dur": 10, "args": {"grid": [512, 1, 1]}},
        {"cat": "kernel", "name": "norm", "ts": 9, "dur": 3, "args": {"grid": [1, 1, 1]}},  # ends 2 us later
        {"cat": "kernel", "name": "gemv", "ts": 11, "dur": 20, "args": {"grid": [1536, 1, 1]}},  # ends 19 later
        {"cat": "kernel", "name": "gemv", "ts": 30, "dur": 6, "args": {"grid": [512, 1, 1]}},  # ends 5 later
        {"cat": "kernel", "name": "norm", "ts": 500, "dur": 3, "args": {"grid": [1, 1, 1]}},  # after the host
    ]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path), "--kernels", "--per", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "1 x    19.00  total         19      9.50  gemv [1536, 1, 1]" in out
    assert "1 x     5.00  total          5      2.50  gemv [512, 1, 1]" in out
    assert "1 x     2.00  total          2      1.00  norm [1, 1, 1]" in out
    assert "all: 26 us; divided by 2: 13.00 us" in out
