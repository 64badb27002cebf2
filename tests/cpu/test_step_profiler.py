"""The opt-in step profiler: window parsing and the report it writes."""

from __future__ import annotations

import pytest
import torch

from distllm.worker.step_profiler import ENV_DIR, ENV_STEPS, StepProfiler, parse_window


def test_parse_window():
    assert parse_window("3:7") == (3, 7)
    for bad in ("7", "a:b", "5:5", "-1:3"):
        with pytest.raises(ValueError, match=ENV_STEPS):
            parse_window(bad)


def test_off_by_default(tmp_path):
    p = StepProfiler(0, env={})
    for _ in range(5):
        p.on_launch()
    assert p.dir is None and p._prof is None and not list(tmp_path.iterdir())


def test_profiles_the_window_and_writes_a_table(tmp_path):
    p = StepProfiler(1, env={ENV_DIR: str(tmp_path), ENV_STEPS: "2:4"})
    for i in range(6):
        p.on_launch()
        assert (p._prof is not None) == (2 <= i < 4)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
    text = (tmp_path / "rank1.txt").read_text()
    assert "steps 2..3 (2 steps), rank 1" in text and "aten::mm" in text
