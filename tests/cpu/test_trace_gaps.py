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
